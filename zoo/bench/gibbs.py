"""Gibbs-chain throughput: chain-steps/s (batch x sweeps / s) of `zoo.ops.gibbs.run_chain`.

Ours: the whole K-sweep chain is one jitted lax.scan: f32 with exact 32-bit uniforms, and with
16-bit uniforms (`uniform_bits=16`, bias < 2^-16) in f32 and with bf16 matmuls (f32 accumulation). Peers in the same process: scikit-learn's `BernoulliRBM.gibbs` called K times,
a plain NumPy chain (matmul + uniform < p), PyTorch eager when installed, and a same-run
ceiling: the chain's two matmuls per sweep with no sampling, jitted the same way.
Quick (CPU): 784x500 B1024 K20 and 64x256 B4096 K50. Full (GPU): 784x500 B1024/B16384,
784x4096 B16384, 4096x4096 B8192, K=100.
Run numpy peers with OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset (see benchmarks/results/README.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zoo.bench import median_seconds
from zoo.ops import gibbs

QUICK = [(784, 500, 1024, 20), (64, 256, 4096, 50)]
FULL = [(784, 500, 1024, 100), (784, 500, 16384, 100), (784, 4096, 16384, 100), (4096, 4096, 8192, 100)]
IMPLS = ("zoo-f32", "zoo-f32-u16", "zoo-bf16-u16", "matmul-ceiling", "numpy", "sklearn", "torch-eager")


def _params(V, H, seed=0):
    r = np.random.default_rng(seed)
    return {"W": r.normal(0, 0.01, (V, H)).astype(np.float32), "b": np.zeros(V, np.float32),
            "c": np.zeros(H, np.float32)}


def numpy_chain(params, v, K, rng):
    W, b, c = params["W"], params["b"], params["c"]
    for _ in range(K):
        h = (rng.random((len(v), W.shape[1]), dtype=np.float32) < 1 / (1 + np.exp(-(v @ W + c)))).astype(np.float32)
        v = (rng.random(v.shape, dtype=np.float32) < 1 / (1 + np.exp(-(h @ W.T + b)))).astype(np.float32)
    return v


def _zoo(params, v0, K, dtype, bits=32):
    p = jax.tree.map(jnp.asarray, params)
    v0 = jnp.asarray(v0)
    f = jax.jit(lambda key, v: gibbs.run_chain(key, p, v, K, compute_dtype=dtype, uniform_bits=bits))
    key = jax.random.PRNGKey(0)
    return lambda: f(key, v0).block_until_ready()


def _ceiling(params, v0, K):
    W = jnp.asarray(params["W"])

    def chain(v):
        def body(v, _):
            return (v @ W) @ W.T, None
        return jax.lax.scan(body, v, None, length=K)[0]

    f, v0 = jax.jit(chain), jnp.asarray(v0)
    return lambda: f(v0).block_until_ready()


def _sklearn(params, v0, K):
    from sklearn.neural_network import BernoulliRBM

    rbm = BernoulliRBM(n_components=params["W"].shape[1])
    rbm.components_, rbm.intercept_hidden_ = params["W"].T.copy(), params["c"]
    rbm.intercept_visible_, rbm.random_state_ = params["b"], np.random.RandomState(0)

    def run():
        v = v0
        for _ in range(K):
            v = rbm.gibbs(v)
        return v

    return run


def _torch(params, v0, K):
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    W, b, c = (torch.as_tensor(params[k], device=dev) for k in ("W", "b", "c"))
    v0 = torch.as_tensor(v0, device=dev)

    def run():
        v = v0
        for _ in range(K):
            h = torch.bernoulli(torch.sigmoid(v @ W + c))
            v = torch.bernoulli(torch.sigmoid(h @ W.T + b))
        if dev == "cuda":
            torch.cuda.synchronize()
        return v

    return run


def bench_case(V, H, B, K, impls=IMPLS, *, iters=5) -> list[dict]:
    params = _params(V, H)
    v0 = (np.random.default_rng(1).random((B, V)) < 0.5).astype(np.float32)
    makers = {
        "zoo-f32": lambda: _zoo(params, v0, K, None),
        "zoo-f32-u16": lambda: _zoo(params, v0, K, None, 16),
        "zoo-bf16-u16": lambda: _zoo(params, v0, K, jnp.bfloat16, 16),
        "matmul-ceiling": lambda: _ceiling(params, v0, K),
        "numpy": lambda: (lambda rng: lambda: numpy_chain(params, v0, K, rng))(np.random.default_rng(0)),
        "sklearn": lambda: _sklearn(params, v0, K),
        "torch-eager": lambda: _torch(params, v0, K),
    }
    on_gpu = jax.default_backend() != "cpu"
    rows = []
    for impl in impls:
        if impl in ("numpy", "sklearn") and on_gpu:
            continue  # CPU peers are not the comparison on an accelerator
        try:
            fn = makers[impl]()
        except ImportError:
            continue  # an optional peer that is not installed
        seconds = median_seconds(fn, warmup=1, iters=iters if impl.startswith(("zoo", "matmul")) else max(2, iters // 2))
        rows.append({"case": f"{V}x{H}-B{B}-K{K}", "impl": impl, "value": B * K / seconds,
                     "unit": "chain-steps/s"})
    return rows


def run(quick: bool) -> list[dict]:
    rows = []
    for V, H, B, K in (QUICK if quick else FULL):
        rows += bench_case(V, H, B, K)
    return rows
