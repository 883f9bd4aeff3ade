"""dot_f32: values and gradients against NumPy, and a backward whose matmuls stay in bf16."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tests.jaxprs import dot_operand_dtypes
from zoo.ops.precision import dot_f32

bf16 = ml_dtypes.bfloat16


def _data(dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32).astype(dtype)
    w = rng.standard_normal((16, 24)).astype(np.float32).astype(dtype)
    g = rng.standard_normal((2, 5, 24)).astype(np.float32)  # a float32 cotangent (of the logits)
    return x, w, g


def test_float32_equals_jnp_dot_with_gradients():
    x, w, g = _data(np.float32)
    y, vjp = jax.vjp(dot_f32, x, w)
    np.testing.assert_allclose(y, np.asarray(x) @ np.asarray(w), rtol=1e-5, atol=1e-5)
    dx, dw = vjp(jnp.asarray(g))
    np.testing.assert_allclose(dx, g @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, x.reshape(-1, 16).T @ g.reshape(-1, 24), rtol=1e-5, atol=1e-4)


def test_bf16_values_and_gradients_against_numpy():
    x, w, g = _data(bf16)
    y, vjp = jax.vjp(dot_f32, jnp.asarray(x), jnp.asarray(w))
    assert y.dtype == jnp.float32  # float32 logits from bf16 operands
    xf, wf = x.astype(np.float32), w.astype(np.float32)
    np.testing.assert_allclose(y, xf @ wf, rtol=1e-5, atol=1e-4)  # exact products, f32 sums
    dx, dw = vjp(jnp.asarray(g))
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    gb = g.astype(bf16).astype(np.float32)  # the cotangent rounded to bf16, then f32 sums
    np.testing.assert_allclose(dx.astype(np.float32), (gb @ wf.T).astype(bf16).astype(np.float32), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(dw.astype(np.float32), (xf.reshape(-1, 16).T @ gb.reshape(-1, 24)).astype(bf16)
                               .astype(np.float32), rtol=1e-2, atol=1e-2)


def test_the_backward_matmuls_stay_in_bf16():
    x, w, _ = _data(bf16)

    def loss(f, x, w):  # a float32 loss of float32 logits, as a language model's
        return jax.nn.logsumexp(f(x, w), -1).sum()

    plain = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
    grad = lambda f: jax.grad(lambda x, w: loss(f, x, w), argnums=(0, 1))
    ours = dot_operand_dtypes(grad(dot_f32), jnp.asarray(x), jnp.asarray(w))
    assert len(ours) == 3 and all(d == ("bfloat16", "bfloat16") for d in ours), ours
    # what dot_f32 exists for (printed, not asserted: a later JAX may keep its backward in bf16)
    print("jnp.dot's backward operand dtypes:", dot_operand_dtypes(grad(plain), jnp.asarray(x), jnp.asarray(w)))


def test_mismatched_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match="matching K"):
        dot_f32(jnp.ones((3, 4)), jnp.ones((5, 2)))
