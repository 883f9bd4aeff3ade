"""zoo.ops.logsumexp: both implementations against NumPy's float64 logsumexp (values, special
values, the gradient), cross_entropy with each against NumPy, bad input, and (with JAX's CUDA
plugin, no GPU needed) the Pallas kernel as XLA compiles GPT-124M's loss for an H200: one pass
over the logits forward, where jax.nn.logsumexp takes two."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.bench.test_hlo import CUDA_PLUGIN
from zoo.ops.logsumexp import logsumexp
from zoo.ops.losses import cross_entropy


def _numpy_lse(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


TILES = [None, (1, 16, 1), (3, 64, 2)]  # the default, and tiles that leave rows and columns over


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_logsumexp_against_numpy(tile, dtype):
    """Values and gradient (softmax) of [2, 7, 300] logits spread over a range of ~60 (so each
    row's max moves from tile to tile); rows and columns not multiples of the tile. The Pallas
    kernel runs in Pallas's interpreter here (on a GPU, as a Triton kernel: the GPU test)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 7, 300)) * 10 + np.linspace(-20, 20, 300), dtype)
    want = _numpy_lse(x)
    ct = rng.standard_normal((2, 7))
    want_grad = np.exp(np.asarray(x, np.float64) - want[..., None]) * ct[..., None]
    for impl in ("xla", "pallas"):
        if impl == "xla" and tile is not None:
            continue
        f = lambda x, impl=impl: logsumexp(x, implementation=impl, **({} if impl == "xla" else {"tile": tile}))  # noqa: E731
        got, vjp = jax.vjp(f, x)
        assert got.dtype == jnp.float32 and got.shape == (2, 7)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-5)
        (grad,) = vjp(jnp.asarray(ct, jnp.float32))
        assert grad.dtype == dtype
        tol = 1e-6 if dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, rtol=tol, atol=tol)


def test_special_values_as_jax_nn_logsumexp():
    """A row of -inf gives -inf, a +inf gives +inf, a NaN gives NaN, a row whose max sits in its
    last tile (the running sum rescaled) and a one-column input are exact too."""
    x = np.random.default_rng(1).standard_normal((6, 40)).astype(np.float32)
    x[0] = -np.inf
    x[1, 5] = np.inf
    x[2, 7] = np.nan
    x[3, :30] = -np.inf
    x[4, 39] = 80.0  # exp(80 - the first tile's max) overflows float32 unless rescaled per tile
    want = np.asarray(jax.nn.logsumexp(jnp.asarray(x), axis=-1))
    got = np.asarray(logsumexp(jnp.asarray(x), implementation="pallas", tile=(2, 8, 1)))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], rtol=1e-6)
    assert got[0] == -np.inf and got[1] == np.inf and np.isnan(got[2])
    one = jnp.asarray([[2.5], [-1.0]], jnp.float32)
    np.testing.assert_array_equal(logsumexp(one, implementation="pallas"), [2.5, -1.0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_with_each_logsumexp_against_numpy(dtype):
    """cross_entropy(logsumexp="xla" | "pallas"): -log softmax[label] and its gradient
    (softmax - onehot) against NumPy float64; the two implementations agree."""
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.standard_normal((3, 5, 70)) * 4, dtype)
    labels = jnp.asarray(rng.integers(0, 70, (3, 5)), jnp.int32)
    x = np.asarray(logits, np.float64)
    lse = _numpy_lse(x)
    want = lse - np.take_along_axis(x, np.asarray(labels)[..., None], -1)[..., 0]
    want_grad = (np.exp(x - lse[..., None]) - np.eye(70)[np.asarray(labels)]) / 15
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    for impl in (None, "xla", "pallas"):
        nll, grad = jax.value_and_grad(lambda z, impl=impl: cross_entropy(z, labels, logsumexp=impl).mean())(logits)
        np.testing.assert_allclose(float(nll), want.mean(), rtol=1e-6)
        assert grad.dtype == dtype
        np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(cross_entropy(logits, labels, logsumexp=impl)), want, rtol=1e-5, atol=1e-5)


def test_bad_input_is_a_clear_error():
    x = jnp.zeros((3, 8))
    with pytest.raises(ValueError, match="implementation must be one of xla, pallas, auto or None; got 'triton'"):
        logsumexp(x, implementation="triton")
    with pytest.raises(ValueError, match=r"x must be \[..., V\] with V >= 1, got shape \(3, 0\)"):
        logsumexp(jnp.zeros((3, 0)))
    with pytest.raises(ValueError, match="x must be floating point, got int32"):
        logsumexp(jnp.zeros((3, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"tile must be .*got \(4, 1000, 4\)"):
        logsumexp(x, implementation="pallas", tile=(4, 1000, 4))
    with pytest.raises(ValueError, match="logsumexp must be one of xla, pallas, auto or None; got 'fast'"):
        cross_entropy(x, jnp.zeros(3, jnp.int32), logsumexp="fast")
    with pytest.raises(ValueError, match=r"need the same leading shape, got \(3, 8\) and \(4,\)"):
        cross_entropy(x, jnp.zeros(4, jnp.int32), logsumexp="pallas")


@pytest.mark.skipif(not CUDA_PLUGIN, reason="needs JAX's CUDA plugin (jax-cuda13-plugin), not a GPU")
def test_pallas_logsumexp_reads_the_logits_once_on_a_gpu():
    """GPT-124M's loss at B64 (65,536 x 50,304 bf16 logits), value and gradient, as XLA compiles
    it for an H200: with logsumexp="pallas" the forward reads the logits once (the Triton kernel,
    in bf16: no float32 copy made for it) and the backward once more (writing their gradient);
    jax.nn.logsumexp's form reads them three times in all."""
    from zoo.bench import hlo

    M, V = 65536, 50304
    arr = M * V * 2
    S = jax.ShapeDtypeStruct

    def reads(impl):
        f = jax.value_and_grad(lambda z, y: cross_entropy(z, y, logsumexp=impl).mean())
        ls = hlo.launches(hlo.compile_for_gpu(f, S((M, V), jnp.bfloat16), S((M,), jnp.int32)).as_text())
        return ls, [x for x in ls if x.read >= arr]

    ls, big = reads("pallas")
    triton = [x for x in ls if x.kind == "custom-call:__gpu$xla.gpu.triton"]
    assert len(triton) == 1 and triton[0].read == arr and triton[0].written == M * 4, ls
    assert len(big) == 2 and sum(x.written >= arr for x in big) == 1, big  # the kernel; the gradient
    assert len(reads("xla")[1]) == 3


@pytest.mark.gpu
def test_pallas_logsumexp_matches_numpy_on_the_device():
    """The Triton kernel on a GPU (bf16 logits, GPT-2's vocabulary, rows not a multiple of the
    tile) and cross_entropy's gradient through it, against NumPy float64."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1027, 50304)) * 3, jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 50304, 1027), jnp.int32)
    got = jax.jit(lambda x: logsumexp(x, implementation="pallas"))(x)
    want = _numpy_lse(x)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-4)
    grad = jax.jit(jax.grad(lambda z: cross_entropy(z, labels, logsumexp="pallas").sum()))(x)
    x64 = np.asarray(x, np.float64)
    want_grad = np.exp(x64 - want[:, None]) - (np.arange(50304) == np.asarray(labels)[:, None])
    np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, rtol=1e-2, atol=1e-2)
