"""zoo.ops.layer_norm.add_layer_norm: both implementations against a NumPy float64 layer norm
(values and every gradient), the "xla" one against flax.linen.LayerNorm, bad input, and (with
JAX's CUDA plugin, no GPU needed) the Pallas kernels as XLA compiles them for an H200: one pass
each way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.bench.test_hlo import CUDA_PLUGIN
from zoo.ops.layer_norm import add_layer_norm


def _numpy(r, d, g, b, ch, cy, eps=1e-5):
    """(h, y, dr, dscale, dbias) in float64 for cotangents ch (of h) and cy (of y); h as the
    dtype rounds it (the layer norm reads the stored sum)."""
    h = np.asarray(r, np.float64) if d is None else np.asarray((r + d).astype(r.dtype), np.float64)
    g64, b64 = np.asarray(g, np.float64), np.asarray(b, np.float64)
    mean = h.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((h - mean) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (h - mean) * rstd
    cy64 = np.asarray(cy, np.float64)
    wdy = cy64 * g64
    dx = rstd * (wdy - wdy.mean(-1, keepdims=True) - xhat * (wdy * xhat).mean(-1, keepdims=True))
    lead = tuple(range(h.ndim - 1))
    return h, xhat * g64 + b64, dx + np.asarray(ch, np.float64), (cy64 * xhat).sum(lead), cy64.sum(lead)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("add", [True, False])
def test_add_layer_norm_against_numpy(implementation, dtype, add):
    """Values and the gradients of r, d, scale and bias, rows not a multiple of the kernels'
    blocks (2 x 35) and a width not a power of two (48: the kernels mask 64 columns to it); the
    Pallas kernels run in Pallas's interpreter here (on a GPU, as Triton kernels: the GPU test)."""
    rng = np.random.default_rng(3)
    shape = (2, 35, 48)
    r = jnp.asarray(rng.standard_normal(shape) * 2 + 1, dtype)
    d = jnp.asarray(rng.standard_normal(shape), dtype) if add else None
    g, b = jnp.asarray(rng.standard_normal(48), jnp.float32), jnp.asarray(rng.standard_normal(48), jnp.float32)
    ch, cy = jnp.asarray(rng.standard_normal(shape), dtype), jnp.asarray(rng.standard_normal(shape), dtype)

    def f(r, d, g, b):
        return add_layer_norm(r, d, g, b, implementation=implementation)

    (h, y), vjp = jax.vjp(f, r, d, g, b)
    dr, dd, dg, db = vjp((ch, cy))
    want_h, want_y, want_dx, want_dg, want_db = _numpy(r, d, g, b, ch, cy)
    assert h.dtype == y.dtype == dr.dtype == dtype and dg.dtype == db.dtype == jnp.float32
    # float32: a few ulps; bf16: the output's one rounding (2^-8 relative of values up to ~10)
    tol = 2e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_array_equal(np.asarray(h, np.float64), want_h)
    np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dr, np.float64), want_dx, rtol=tol, atol=tol)
    if add:
        np.testing.assert_array_equal(np.asarray(dd), np.asarray(dr))
    else:
        assert dd is None
    sum_tol = 1e-4 if dtype == jnp.float32 else 0.5  # sums of 70 rounded products
    np.testing.assert_allclose(np.asarray(dg), want_dg, rtol=sum_tol, atol=sum_tol)
    np.testing.assert_allclose(np.asarray(db), want_db, rtol=sum_tol, atol=sum_tol)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("add", [True, False])
def test_copies_hand_out_y_and_sum_their_gradients(implementation, add):
    """copies=3: y three times (equal), and the gradients of r, d, scale and bias for three
    different cotangents, one per copy, are those of their sum (NumPy float64)."""
    rng = np.random.default_rng(6)
    shape = (3, 22, 40)
    r = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    d = jnp.asarray(rng.standard_normal(shape), jnp.float32) if add else None
    g, b = jnp.asarray(rng.standard_normal(40), jnp.float32), jnp.asarray(rng.standard_normal(40), jnp.float32)
    ch = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    cys = tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
    (h, ys), vjp = jax.vjp(lambda r, d, g, b: add_layer_norm(r, d, g, b, implementation=implementation, copies=3),
                           r, d, g, b)
    dr, dd, dg, db = vjp((ch, cys))
    want_h, want_y, want_dx, want_dg, want_db = _numpy(r, d, g, b, ch, sum(cys))
    assert isinstance(ys, tuple) and len(ys) == 3
    for y in ys:
        np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(dr, np.float64), want_dx, rtol=2e-5, atol=2e-5)
    assert (dd is None) == (not add)
    np.testing.assert_allclose(np.asarray(dg), want_dg, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(db), want_db, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_d_bias_is_added_with_d_and_gets_the_column_sums(implementation, dtype):
    """d_bias: h = r + d + d_bias (float32, rounded once), and d_bias's gradient is the column sum
    of h's whole gradient (the layer norm's part and h's own), against NumPy float64; with
    copies=3 as the transformer's blocks use it."""
    rng = np.random.default_rng(7)
    shape = (2, 35, 48)
    r, d = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))
    g, b, dbias = (jnp.asarray(rng.standard_normal(48), jnp.float32) for _ in range(3))
    ch = jnp.asarray(rng.standard_normal(shape), dtype)
    cys = tuple(jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))
    (h, ys), vjp = jax.vjp(lambda r, d, g, b, e: add_layer_norm(r, d, g, b, implementation=implementation,
                                                                copies=3, d_bias=e), r, d, g, b, dbias)
    dr, dd, dg, db, de = vjp((ch, cys))
    r32, d32, e32 = (np.asarray(a, np.float32) for a in (r, d, dbias))  # the sum in float32, in this order
    want_h = ((r32 + d32) + e32).astype(np.asarray(r).dtype).astype(np.float64)
    np.testing.assert_array_equal(np.asarray(h, np.float64), want_h)
    _, want_y, want_dx, want_dg, want_db = _numpy(jnp.asarray(want_h, dtype), None, g, b, ch,
                                                  sum(np.asarray(c, np.float64) for c in cys))
    tol, sum_tol = (2e-5, 1e-4) if dtype == jnp.float32 else (5e-2, 0.5)
    np.testing.assert_allclose(np.asarray(ys[0], np.float64), want_y, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dr, np.float64), want_dx, rtol=tol, atol=tol)
    np.testing.assert_array_equal(np.asarray(dd), np.asarray(dr))
    assert de.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(de), want_dx.sum((0, 1)), rtol=sum_tol, atol=sum_tol)
    np.testing.assert_allclose(np.asarray(dg), want_dg, rtol=sum_tol, atol=sum_tol)
    np.testing.assert_allclose(np.asarray(db), want_db, rtol=sum_tol, atol=sum_tol)


def test_xla_layer_norm_is_flax_layer_norm():
    """The "xla" form computes flax.linen.LayerNorm's function (GPT-2's params load into either)."""
    import flax.linen as nn

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((5, 24)) * 3, jnp.float32)
    g, b = jnp.asarray(rng.standard_normal(24), jnp.float32), jnp.asarray(rng.standard_normal(24), jnp.float32)
    want = nn.LayerNorm(1e-5).apply({"params": {"scale": g, "bias": b}}, x)
    for impl in ("xla", "pallas"):
        _, y = add_layer_norm(x, None, g, b, implementation=impl)
        np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bad_input_is_a_clear_error():
    x = jnp.zeros((3, 8))
    g = jnp.ones(8)
    with pytest.raises(ValueError, match="implementation must be one of xla, pallas, auto or None; got 'triton'"):
        add_layer_norm(x, None, g, g, implementation="triton")
    with pytest.raises(ValueError, match=r"r and d need one shape, got \(3, 8\) and \(3, 4\)"):
        add_layer_norm(x, jnp.zeros((3, 4)), g, g)
    with pytest.raises(ValueError, match=r"scale and bias must be \[8\], got \(4,\) and \(8,\)"):
        add_layer_norm(x, None, jnp.ones(4), g)
    with pytest.raises(ValueError, match="copies must be an int >= 1, got 0"):
        add_layer_norm(x, None, g, g, copies=0)
    with pytest.raises(ValueError, match=r"d_bias must be \[8\] and come with d, got no d"):
        add_layer_norm(x, None, g, g, d_bias=g)
    with pytest.raises(ValueError, match=r"d_bias must be \[8\] and come with d, got \(4,\)"):
        add_layer_norm(x, x, g, g, d_bias=jnp.ones(4))


@pytest.mark.skipif(not CUDA_PLUGIN, reason="needs JAX's CUDA plugin (jax-cuda13-plugin), not a GPU")
def test_pallas_kernels_read_each_array_once_on_a_gpu():
    """add_layer_norm(implementation="pallas") as XLA compiles it for an H200: the forward one
    Triton kernel reading r and d and writing h and y (plus 8 B of statistics per row), the
    backward one reading h, y's gradient and h's gradient and writing dx (plus the scale and bias
    gradients' partial sums, one row of each per 64 rows); no other pass over an [M, H] array."""
    from zoo.bench import hlo

    M, H = 65536, 768
    arr = M * H * 2

    def f(r, d, g, b, ch, cy):
        (h, y), vjp = jax.vjp(lambda r, d, g, b: add_layer_norm(r, d, g, b, implementation="pallas"), r, d, g, b)
        dr, _, dg, db = vjp((ch, cy))
        return y, dr, dg, db

    S = jax.ShapeDtypeStruct
    args = [S((M, H), jnp.bfloat16)] * 2 + [S((H,), jnp.float32)] * 2 + [S((M, H), jnp.bfloat16)] * 2
    ls = hlo.launches(hlo.compile_for_gpu(f, *args).as_text())
    triton = [x for x in ls if x.kind == "custom-call:__gpu$xla.gpu.triton"]
    assert len(triton) == 2, ls
    fwd, bwd = triton
    assert fwd.read == 2 * arr + 2 * H * 4 and fwd.written == 2 * arr + 2 * M * 4
    partials = 2 * (M // 64) * H * 4
    assert bwd.read == 3 * arr + H * 4 + 2 * M * 4 and bwd.written == arr + partials
    assert all(x.bytes < arr for x in ls if x not in triton and x.kind != "copy"), ls

    # three copies of y (three consumers): the backward kernel reads their three gradients itself
    def f3(r, d, g, b, ch, cy):
        (h, ys), vjp = jax.vjp(lambda r, d, g, b: add_layer_norm(r, d, g, b, implementation="pallas", copies=3),
                               r, d, g, b)
        return vjp((ch, (cy, cy * 2, cy * 3)))[0]

    ls = hlo.launches(hlo.compile_for_gpu(f3, *args).as_text())
    triton = [x for x in ls if x.kind == "custom-call:__gpu$xla.gpu.triton"]
    assert len(triton) == 2 and triton[1].read == 5 * arr + H * 4 + 2 * M * 4, ls


@pytest.mark.gpu
def test_pallas_layer_norm_matches_numpy_on_the_device():
    """The Triton kernels on a GPU (bf16, GPT-124M's width, rows not a multiple of the blocks)
    against NumPy's float64 layer norm and its gradients."""
    rng = np.random.default_rng(5)
    shape = (4100, 768)
    r, d = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(2))
    g, b = jnp.asarray(rng.standard_normal(768), jnp.float32), jnp.asarray(rng.standard_normal(768), jnp.float32)
    ch, cy = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(2))
    f = jax.jit(lambda r, d, g, b: add_layer_norm(r, d, g, b, implementation="pallas"))
    (h, y), vjp = jax.vjp(f, r, d, g, b)
    dr, dd, dg, db = vjp((ch, cy))
    want_h, want_y, want_dx, want_dg, want_db = _numpy(r, d, g, b, ch, cy)
    np.testing.assert_array_equal(np.asarray(h, np.float64), want_h)
    np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(np.asarray(dr, np.float64), want_dx, rtol=5e-2, atol=5e-2)
    np.testing.assert_array_equal(np.asarray(dd), np.asarray(dr))
    np.testing.assert_allclose(np.asarray(dg), want_dg, rtol=2e-2, atol=2.0)
    np.testing.assert_allclose(np.asarray(db), want_db, rtol=2e-2, atol=2.0)
    # as the transformer's blocks call it: three copies of y, the layer before's bias added here
    e = jnp.asarray(rng.standard_normal(768), jnp.float32)
    cys = (cy, ch, cy)
    f3 = jax.jit(lambda r, d, g, b, e: add_layer_norm(r, d, g, b, implementation="pallas", copies=3, d_bias=e))
    (h, ys), vjp = jax.vjp(f3, r, d, g, b, e)
    dr, _, dg, db, de = vjp((ch, cys))
    r32, d32 = np.asarray(r, np.float32), np.asarray(d, np.float32)
    want_h = ((r32 + d32) + np.asarray(e)).astype(np.asarray(r).dtype).astype(np.float64)
    np.testing.assert_array_equal(np.asarray(h, np.float64), want_h)
    _, want_y, want_dx, want_dg, want_db = _numpy(jnp.asarray(want_h, jnp.bfloat16), None, g, b, ch,
                                                  sum(np.asarray(c, np.float64) for c in cys))
    np.testing.assert_allclose(np.asarray(ys[2], np.float64), want_y, rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(np.asarray(dr, np.float64), want_dx, rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(np.asarray(de), want_dx.sum(0), rtol=2e-2, atol=2.0)
    np.testing.assert_allclose(np.asarray(dg), want_dg, rtol=2e-2, atol=2.0)


@pytest.mark.gpu
def test_auto_runs_the_kernels_on_the_device():
    """On an NVIDIA GPU, "auto" (GPTConfig's layer_norm and logsumexp defaults) runs the Triton
    kernels: the device is told as one, and the default GPT's compiled step holds them, its loss
    and gradients those of the plain layer norm's and logsumexp's model (float32)."""
    import dataclasses

    from zoo.models.gpt import GPTConfig, make_gpt
    from zoo.ops import _pallas

    assert _pallas.on_cuda_gpu()
    cfg = GPTConfig(vocab_size=64, max_len=32, num_layers=2, hidden=64, num_heads=4)
    batch = {"x": jnp.asarray(np.random.default_rng(1).integers(0, 64, (4, 33)), jnp.int32),
             "idx": jnp.arange(4, dtype=jnp.int32)}
    params = make_gpt(cfg).init(jax.random.key(0), batch)
    step = {}
    for name, c in (("auto", cfg), ("plain", dataclasses.replace(cfg, layer_norm="xla", logsumexp="xla"))):
        md = make_gpt(c)
        step[name] = jax.jit(jax.value_and_grad(lambda p, md=md: md.loss(p, jax.random.key(1), batch)[0]))
    # float32 matmuls in full (not TF32): the two programs differ in the layer norms and the loss only
    with jax.default_matmul_precision("float32"):
        assert "__gpu$xla.gpu.triton" in step["auto"].lower(params).compile().as_text()
        assert "__gpu$xla.gpu.triton" not in step["plain"].lower(params).compile().as_text()
        (loss, grads), (want_loss, want_grads) = step["auto"](params), step["plain"](params)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)
