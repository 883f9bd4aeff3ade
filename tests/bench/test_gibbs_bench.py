"""The gibbs benchmark's peers compute the same chain, and its rows are well formed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.bench import gibbs as bench
from zoo.ops import gibbs, native


def _tiny_params():
    r = np.random.default_rng(0)
    return {"W": r.normal(0, 0.3, (16, 12)).astype(np.float32), "b": r.normal(0, 0.5, 16).astype(np.float32),
            "c": r.normal(0, 0.5, 12).astype(np.float32)}


def test_numpy_peer_matches_zoo_chain_statistics():
    params = _tiny_params()
    v0 = np.zeros((20000, 16), np.float32)
    peer = bench.numpy_chain(params, v0, 30, np.random.default_rng(0))
    for uniforms in gibbs.UNIFORMS:
        ours = gibbs.run_chain(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, params), jnp.asarray(v0), 30,
                               uniforms=uniforms)
        np.testing.assert_allclose(np.asarray(ours).mean(0), peer.mean(0), atol=0.02)


def test_sklearn_peer_matches_numpy_peer():
    params = _tiny_params()
    v0 = np.zeros((20000, 16), np.float32)
    sk = bench.MAKERS["sklearn-BernoulliRBM.gibbs"](params, v0, 30)()
    peer = bench.numpy_chain(params, v0, 30, np.random.default_rng(1))
    np.testing.assert_allclose(sk.mean(0), peer.mean(0), atol=0.02)


def test_rows_are_well_formed():
    impls = ("zoo-f32", "zoo-f32-xla", "zoo-f32-threefry", "zoo-bf16", "matmul-ceiling", "matmul-ceiling-native",
             "numpy", "sklearn-BernoulliRBM.gibbs")
    rows = bench.bench_case(8, 6, 16, 3, impls + ("torch-eager",), rounds=2)
    if not native.available():  # the native ceiling needs the C++ kernels
        impls = tuple(i for i in impls if i != "matmul-ceiling-native")
    assert [r["impl"] for r in rows][:len(impls)] == list(impls)  # torch-eager only when installed
    for r in rows:
        assert set(r) == {"case", "impl", "value", "unit"}
        assert r["case"] == "8x6-B16-K3" and r["unit"] == "chain-steps/s" and r["value"] > 0


def test_cublas_variant_is_the_same_chain():
    """zoo-bf16-cublas (GPU-only in the benchmark) differs from zoo-bf16 in a compiler option
    alone: this XLA takes the option, and the chain's samples are the same."""
    params = _tiny_params()
    v0 = (np.random.default_rng(2).random((64, 16)) < 0.5).astype(np.float32)
    a = bench.MAKERS["zoo-bf16"](params, v0, 5)()
    b = bench.MAKERS["zoo-bf16-cublas"](params, v0, 5)()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "zoo-bf16-cublas" in bench.ACCELERATOR_ONLY


def test_native_ceiling_is_the_thresholded_chain():
    """matmul-ceiling-native runs the kernel's GEMMs with the XLA ceiling's `>= 0` threshold:
    the same states (a unit whose input rounds across 0 differently aside)."""
    if not native.available():
        pytest.skip(f"the native kernels do not build here: {native.unavailable_reason()}")
    params = _tiny_params()
    v0 = (np.random.default_rng(3).random((64, 16)) < 0.5).astype(np.float32)
    W = jnp.asarray(params["W"])
    want = v0
    for _ in range(4):
        h = (want @ params["W"] >= 0).astype(np.float32)
        want = (h @ params["W"].T >= 0).astype(np.float32)
    seeds, rows = jnp.zeros((64, 4, 2, 2), jnp.uint32), jnp.arange(64, dtype=jnp.uint32)
    got = native.gibbs_chain(jnp.asarray(v0), seeds, rows, W, jnp.ones(16), jnp.ones(12), gemm_only=True)[:, 0]
    assert np.mean(np.all(np.asarray(got) == want, axis=1)) >= 0.95
    assert 0.2 < want.mean() < 0.8  # a chain that did not die out
