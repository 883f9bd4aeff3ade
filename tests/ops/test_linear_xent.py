"""zoo.ops.logsumexp.cross_entropy_and_grad (the loss and its gradient in the logits, XLA's form
and the Pallas kernel) and zoo.ops.losses.linear_cross_entropy (the output layer and the loss as
one op) against NumPy float64; bad input; with JAX's CUDA plugin (no GPU needed), what XLA
compiles for GPT-124M's output layer and loss on an H200: the backward never reads the logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.bench.test_hlo import CUDA_PLUGIN
from zoo.ops.logsumexp import cross_entropy_and_grad
from zoo.ops.losses import cross_entropy, linear_cross_entropy


def _numpy_xent(x, labels):
    """(nll, softmax - onehot) in float64; a label outside [0, V) picks and subtracts nothing."""
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
    onehot = np.arange(x.shape[-1]) == np.asarray(labels)[..., None]
    return lse - np.where(onehot, x, 0.0).sum(-1), np.exp(x - lse[..., None]) - onehot


# the kernel's default; tiles leaving rows and columns over; one tile holding the whole row
TILES = [None, (1, 16, 1), (3, 64, 2), (2, 512, 1)]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("dtype,grad_dtype", [(jnp.float32, None), (jnp.bfloat16, None), (jnp.float32, jnp.bfloat16)])
def test_cross_entropy_and_grad_against_numpy(tile, dtype, grad_dtype):
    """[2, 7, 300] logits spread over ~60 (each row's max moves from tile to tile), labels
    anywhere in the row: nll and d against NumPy; nll's derivative is d (any cotangent) and d
    is a constant to autodiff. The kernel runs in Pallas's interpreter here."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 7, 300)) * 10 + np.linspace(-20, 20, 300), dtype)
    labels = jnp.asarray(rng.integers(0, 300, (2, 7)), jnp.int32)
    want_nll, want_d = _numpy_xent(x, labels)
    ct = jnp.asarray(rng.standard_normal((2, 7)), jnp.float32)
    for impl in ("xla", "pallas"):
        if impl == "xla" and tile is not None:
            continue
        kw = {"implementation": impl, "grad_dtype": grad_dtype, **({"tile": tile} if impl == "pallas" else {})}
        nll, d = cross_entropy_and_grad(x, labels, **kw)
        assert nll.dtype == jnp.float32 and d.dtype == (grad_dtype or dtype) and d.shape == x.shape
        np.testing.assert_allclose(np.asarray(nll, np.float64), want_nll, rtol=1e-6, atol=2e-5)
        tol = 1e-6 if d.dtype == jnp.float32 else 8e-3
        np.testing.assert_allclose(np.asarray(d, np.float64), want_d, rtol=tol, atol=tol)
        g = jax.grad(lambda z: jnp.sum(cross_entropy_and_grad(z, labels, **kw)[0] * ct))(x)
        # g is in x's dtype, from float32 softmax before any rounding (float32: exp of logits ~30 in size)
        gtol = 1e-2 if dtype == jnp.bfloat16 else 2e-5
        np.testing.assert_allclose(np.asarray(g, np.float64), want_d * np.asarray(ct)[..., None], rtol=gtol, atol=gtol)
        assert not np.any(jax.grad(lambda z: jnp.sum(cross_entropy_and_grad(z, labels, **kw)[1]))(x))


def test_labels_outside_the_row_and_masked_columns():
    """A label past the row (or negative) picks nothing and subtracts no one-hot; -inf logits (a
    masked vocabulary) get zero probability; both forms agree with NumPy."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 40)).astype(np.float32)
    x[1, 10:] = -np.inf
    labels = jnp.asarray([3, 2, 40, -1, 39], jnp.int32)
    want_nll, want_d = _numpy_xent(x, labels)
    for impl, tile in (("xla", None), ("pallas", (2, 8, 1)), ("pallas", (4, 64, 1))):
        nll, d = cross_entropy_and_grad(jnp.asarray(x), labels, implementation=impl, tile=tile)
        np.testing.assert_allclose(np.asarray(nll), want_nll, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(d), want_d, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("impl", [None, "pallas"])
@pytest.mark.parametrize("dtype,logits_dtype", [(jnp.float32, None), (jnp.bfloat16, None), (jnp.bfloat16, jnp.float32)])
def test_linear_cross_entropy_against_numpy(impl, dtype, logits_dtype):
    """Value and gradients (h and w, per-token weights as the loss's cotangent) against NumPy
    float64, and against cross_entropy(h @ w.T) by autodiff: the same function, to the
    rounding of the compute dtype."""
    rng = np.random.default_rng(2)
    h = jnp.asarray(rng.standard_normal((3, 5, 16)), dtype)
    w32 = jnp.asarray(rng.standard_normal((70, 16)) * 0.5, jnp.float32)  # float32 params, cast inside
    labels = jnp.asarray(rng.integers(0, 70, (3, 5)), jnp.int32)
    weights = jnp.asarray(rng.uniform(0, 1, (3, 5)), jnp.float32)

    def loss(h, w):
        return jnp.sum(linear_cross_entropy(h, w, labels, logits_dtype=logits_dtype, logsumexp=impl) * weights)

    val, (gh, gw) = jax.value_and_grad(loss, (0, 1))(h, w32)
    assert gh.dtype == dtype and gw.dtype == jnp.float32
    h64, w64 = np.asarray(h, np.float64), np.asarray(jnp.asarray(w32, dtype), np.float64)
    nll, d = _numpy_xent(h64 @ w64.T, labels)
    wd = d * np.asarray(weights, np.float64)[..., None]
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(float(val), float(np.sum(nll * np.asarray(weights))), rtol=tol)
    np.testing.assert_allclose(np.asarray(gh, np.float64), wd @ w64, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(gw, np.float64), np.einsum("btv,bth->vh", wd, h64), rtol=tol, atol=tol)
    if dtype == jnp.float32:
        ref = jax.grad(lambda h, w: jnp.sum(cross_entropy(h @ w.T, labels) * weights), (0, 1))(h, w32)
        np.testing.assert_allclose(np.asarray(gh), np.asarray(ref[0]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(gw), np.asarray(ref[1]), rtol=1e-5, atol=1e-6)


def test_bad_input_is_a_clear_error():
    x = jnp.zeros((3, 8))
    y = jnp.zeros(3, jnp.int32)
    with pytest.raises(ValueError, match="implementation must be one of xla, pallas, auto or None; got 'triton'"):
        cross_entropy_and_grad(x, y, implementation="triton")
    with pytest.raises(ValueError, match=r"need the same leading shape, got \(3, 8\) and \(4,\)"):
        cross_entropy_and_grad(x, jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="labels integer, got float32 and float32"):
        cross_entropy_and_grad(x, jnp.zeros(3))
    with pytest.raises(ValueError, match="grad_dtype must be floating point, got int8"):
        cross_entropy_and_grad(x, y, grad_dtype=jnp.int8)
    with pytest.raises(ValueError, match=r"tile must be .*got \(1, 100, 4\)"):
        cross_entropy_and_grad(x, y, implementation="pallas", tile=(1, 100, 4))
    with pytest.raises(ValueError, match=r"want h \[..., H\], w \[V, H\] and labels \[...\] with h's leading shape, "
                                         r"got \(3, 8\), \(10, 7\) and \(3,\)"):
        linear_cross_entropy(x, jnp.zeros((10, 7)), y)
    with pytest.raises(ValueError, match="logsumexp must be one of xla, pallas, auto or None; got 'fast'"):
        linear_cross_entropy(x, jnp.zeros((10, 8)), y, logsumexp="fast")


@pytest.mark.skipif(not CUDA_PLUGIN, reason="needs JAX's CUDA plugin (jax-cuda13-plugin), not a GPU")
def test_the_backward_never_reads_the_logits_on_a_gpu():
    """GPT-124M's output layer and loss at B64 (h [65,536, 768] bf16, the tied [50,304, 768]
    table), value and gradients, as XLA compiles them for an H200. linear_cross_entropy with the
    Pallas kernel: one kernel reads the logits and writes d, and only the backward's two matmuls
    read d: three passes over a logits-sized array besides the matmul that writes it. Split
    apart (cross_entropy with the same kernel), four."""
    from zoo.bench import hlo

    M, V, H = 65536, 50304, 768
    arr = M * V * 2
    S = jax.ShapeDtypeStruct

    def big(f):
        g = jax.value_and_grad(lambda h, w, y: f(h, w, y).mean(), (0, 1))
        text = hlo.compile_for_gpu(g, S((M, H), jnp.bfloat16), S((V, H), jnp.float32), S((M,), jnp.int32)).as_text()
        ls = hlo.launches(text)
        return ls, [x for x in ls if x.read >= arr or x.written >= arr]

    ls, fused = big(lambda h, w, y: linear_cross_entropy(h, w, y, logsumexp="pallas"))
    triton = [x for x in ls if x.kind == "custom-call:__gpu$xla.gpu.triton"]
    assert len(triton) == 1 and triton[0].read == arr + M * 4 and triton[0].written == arr + M * 4, triton
    assert sum(x.read >= arr for x in fused) == 3, fused  # the kernel, then the backward's two matmuls
    split = big(lambda h, w, y: cross_entropy(h @ w.astype(h.dtype).T, y, logsumexp="pallas"))[1]
    assert sum(x.read >= arr for x in split) == 4, split


@pytest.mark.gpu
def test_cross_entropy_and_grad_matches_numpy_on_the_device():
    """The Triton kernel on a GPU (bf16 logits, GPT-2's vocabulary, rows not a multiple of the
    tile) against NumPy float64, and linear_cross_entropy's gradients against the split form."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1027, 50304)) * 3, jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 50304, 1027), jnp.int32)
    nll, d = jax.jit(lambda x: cross_entropy_and_grad(x, labels, implementation="pallas"))(x)
    want_nll, want_d = _numpy_xent(x, labels)
    np.testing.assert_allclose(np.asarray(nll, np.float64), want_nll, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(np.asarray(d, np.float64), want_d, rtol=1e-2, atol=1e-2)
    h = jnp.asarray(rng.standard_normal((1027, 768)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((50304, 768)) * 0.02, jnp.float32)
    fused = jax.jit(jax.grad(lambda h, w: linear_cross_entropy(h, w, labels, logsumexp="pallas").mean(), (0, 1)))(h, w)
    split = jax.jit(jax.grad(lambda h, w: cross_entropy(h @ w.astype(h.dtype).T, labels).mean(), (0, 1)))(h, w)
    for a, b in zip(fused, split):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=5e-2, atol=2e-4)
