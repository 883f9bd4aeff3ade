"""zoo.nn.dense and zoo.ops.linear: the 2-D matmul form is flax's Dense / x @ w in params, values and gradients, and
its dots are 2-D (the weight gradient contracts one axis, the point of the layer)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.jaxprs import equations
from zoo.nn.dense import Dense
from zoo.ops.linear import matmul


def test_dense_is_flax_dense_with_two_dimensional_dots():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 5, 4)), jnp.float32)
    ours, flax_dense = Dense(6), nn.Dense(6)
    params = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_dense.init(jax.random.key(1), x))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(flax_dense.init(jax.random.key(1), x))):
        np.testing.assert_array_equal(a, b)  # the same init
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    w = jnp.asarray(rng.standard_normal((2, 3, 5, 6)), jnp.float32)
    loss = lambda layer: lambda p, x: jnp.sum(jnp.sin(layer.apply(p, x)) * w)  # noqa: E731
    np.testing.assert_allclose(ours.apply(params, x), flax_dense.apply(params, x), rtol=1e-6, atol=1e-6)
    for g, r in zip(jax.tree.leaves(jax.grad(loss(ours), (0, 1))(params, x)),
                    jax.tree.leaves(jax.grad(loss(flax_dense), (0, 1))(params, x))):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    jaxpr = jax.make_jaxpr(jax.grad(loss(ours)))(params, x)
    dots = [e for e in equations(jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) == 2  # y and the kernel's gradient, each on [30, ...] operands
    assert all(v.aval.shape[0] in (30, 4, 6) and len(v.aval.shape) == 2 for e in dots for v in e.invars)
    plain = [e for e in equations(jax.make_jaxpr(jax.grad(loss(flax_dense)))(params, x))
             if e.primitive.name == "dot_general"]
    assert any(len(v.aval.shape) == 4 for e in plain for v in e.invars)  # flax's dots see [2, 3, 5, 4]


def test_matmul_is_x_at_w():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 4, 5)), rng.standard_normal((5, 2))
    np.testing.assert_allclose(np.asarray(matmul(jnp.asarray(x), jnp.asarray(w))), x @ w, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(matmul(jnp.asarray(x[0, 0]), jnp.asarray(w))), x[0, 0] @ w, rtol=1e-5)


def test_add_bias_in_the_output_dtype_with_a_float32_bias_gradient():
    """add_bias(y, b): float32 y: y + b. bf16 / float16 y: the bias rounded to y's dtype and added
    there (PyTorch autocast's linear layer; on a GPU cuBLASLt's epilogue, tests/bench/test_hlo.py),
    its gradient the float32 sum of y's gradient: within float32 rounding of NumPy's float64 sum
    over 4,096 rows, where a bf16 sum (of sums near 2,000, bf16's spacing there 8) is off by more
    than 0.1."""
    from zoo.ops.linear import add_bias

    rng = np.random.default_rng(3)
    y64 = rng.standard_normal((4096, 24))
    b = jnp.asarray(rng.standard_normal(24) + 0.3, jnp.float32)
    g64 = rng.standard_normal((4096, 24)) + 0.5
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        y, g = jnp.asarray(y64, dtype), jnp.asarray(g64, dtype)
        out, vjp = jax.vjp(add_bias, y, b)
        assert out.dtype == dtype
        want = (np.asarray(y, np.float64) + np.asarray(b.astype(dtype), np.float64)).astype(dtype)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(want))  # one rounding of the exact sum
        dy, db = vjp(g)
        assert dy.dtype == dtype and db.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(dy), np.asarray(g))
        exact = np.asarray(g, np.float64).sum(0)
        np.testing.assert_allclose(np.asarray(db, np.float64), exact, rtol=1e-5, atol=1e-3)
    # what the float32 sum avoids: the same sum in bf16 is off by far more
    bf16_sum = np.asarray(jnp.sum(jnp.asarray(g64, jnp.bfloat16), axis=0, dtype=jnp.bfloat16), np.float64)
    assert np.abs(bf16_sum - np.asarray(jnp.asarray(g64, jnp.bfloat16), np.float64).sum(0)).max() > 1e-1


@pytest.mark.gpu
def test_bf16_bias_add_in_the_matmul_matches_numpy_on_the_device():
    """On a GPU add_bias folds into cuBLASLt's BIAS epilogue (XLA has had wrong results in those
    epilogues: openxla/xla#46110, #46897): the jitted bf16 matmul + bias and its gradients against
    NumPy's float64, to bf16's rounding."""
    from zoo.ops.linear import add_bias

    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((4096, 256)), rng.standard_normal((256, 768)) / 16
    b, g = rng.standard_normal(768), rng.standard_normal((4096, 768))
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)

    def f(x, w, b):
        return add_bias(x @ w, b)

    out, vjp = jax.vjp(jax.jit(f), xb, wb, jnp.asarray(b, jnp.float32))
    xr, wr = np.asarray(xb, np.float64), np.asarray(wb, np.float64)
    np.testing.assert_allclose(np.asarray(out, np.float64), xr @ wr + b, rtol=2e-2, atol=2e-2)
    dx, dw, db = vjp(jnp.asarray(g, jnp.bfloat16))
    gr = np.asarray(jnp.asarray(g, jnp.bfloat16), np.float64)
    np.testing.assert_allclose(np.asarray(db, np.float64), gr.sum(0), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(np.asarray(dw, np.float64), xr.T @ gr, rtol=2e-2, atol=0.5)
    np.testing.assert_allclose(np.asarray(dx, np.float64), gr @ wr.T, rtol=2e-2, atol=0.1)


@pytest.mark.gpu
def test_gelu_epilogue_in_the_matmul_matches_numpy_on_the_device():
    """On a GPU the "epilogue" GELU form folds the bias and the GELU into cuBLASLt's BIAS_GELU_AUX
    epilogue (tests/bench/test_hlo.py), whose aux output, z = x @ w + b, the backward reads: the
    jitted bf16 matmul + bias + GELU and its gradients against NumPy's float64 (GPT-2's tanh GELU
    and its derivative), to bf16's rounding."""
    from zoo.ops.gelu import bias_gelu

    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((4096, 256)), rng.standard_normal((256, 768)) / 16
    b, g = rng.standard_normal(768), rng.standard_normal((4096, 768))
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    out, vjp = jax.vjp(jax.jit(lambda x, w, b: bias_gelu(x @ w, b, "epilogue")), xb, wb, jnp.asarray(b, jnp.float32))
    xr, wr = np.asarray(xb, np.float64), np.asarray(wb, np.float64)
    z = xr @ wr + b
    c, a = np.sqrt(2 / np.pi), 0.044715
    t = np.tanh(c * (z + a * z**3))
    np.testing.assert_allclose(np.asarray(out, np.float64), 0.5 * z * (1 + t), rtol=2e-2, atol=2e-2)
    gr = np.asarray(jnp.asarray(g, jnp.bfloat16), np.float64)
    dz = gr * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * a * z * z))
    dx, dw, db = vjp(jnp.asarray(g, jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(db, np.float64), dz.sum(0), rtol=2e-2, atol=0.5)
    np.testing.assert_allclose(np.asarray(dw, np.float64), xr.T @ dz, rtol=2e-2, atol=0.5)
    np.testing.assert_allclose(np.asarray(dx, np.float64), dz @ wr.T, rtol=2e-2, atol=0.1)
