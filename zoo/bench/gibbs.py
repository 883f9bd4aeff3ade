"""Gibbs-chain throughput: chain-steps/s (batch x sweeps / s) of `zoo.ops.gibbs.run_chain`.

Ours: `zoo-f32`: f32 with the default hashed uniforms and the default implementation (on CPU the
C++ kernel, zoo/ops/csrc/gibbs.cc, whose GEMMs are bf16x3 on Intel AMX -- float32-accurate --
and float32 FMA elsewhere; on an accelerator one jitted lax.scan); `zoo-f32-xla` (CPU): the same
chain as one jitted lax.scan of XLA code; `zoo-f32-threefry`: jax.random.uniform per half-sweep
(XLA); `zoo-bf16`: bf16 matmuls with f32 accumulation (XLA; no native bf16 on AVX2 CPUs: slower
there); on a GPU also `zoo-bf16-cublas`, the same program compiled with XLA's GEMMs through cuBLAS
only. Peers in the same process: scikit-learn's `BernoulliRBM.gibbs` called K times, a plain NumPy
chain (matmul + uniform < p), PyTorch eager (matmul + bernoulli) when installed (on CUDA also in
bf16: `torch-eager-bf16`; `torch-eager` is float32 with torch's default of no TF32, while JAX's
default GPU precision for float32 matmuls may use TF32). Ceilings, in the same chain-steps/s:
`matmul-ceiling`, the chain's two matmuls per sweep with only a `>= 0` threshold between them
(binary inputs like the chain's, and no denormal decay), jitted as one lax.scan (XLA's float32
GEMMs; on an accelerator also `matmul-ceiling-bf16`, bf16 operands with f32 accumulation like
`zoo-bf16`); `matmul-ceiling-native` (CPU), the C++ kernel's GEMMs with the same threshold.
Implementations are timed in interleaved rounds (each round calls every implementation once, after
a short pause that lets OpenBLAS's spinning threads go idle) so a drift in machine load hits all
alike; the value is the median over rounds.
Quick (CPU): 784x500 B1024 K20, 64x256 B4096 K50. Full (accelerator): 784x500 B1024/B16384,
784x4096 B16384, 4096x4096 B8192, K=100; the CPU peers are skipped on an accelerator.
Run with OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset (they slow NumPy; see benchmarks/results/README.md).
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np

from zoo.bench import emit, interleaved_times
from zoo.ops import gibbs

QUICK = [(784, 500, 1024, 20), (64, 256, 4096, 50)]
FULL = [(784, 500, 1024, 100), (784, 500, 16384, 100), (784, 4096, 16384, 100), (4096, 4096, 8192, 100)]
IMPLS = ("zoo-f32", "zoo-f32-xla", "zoo-f32-threefry", "zoo-bf16", "zoo-bf16-cublas", "matmul-ceiling",
         "matmul-ceiling-native", "matmul-ceiling-bf16",
         "numpy", "sklearn-BernoulliRBM.gibbs", "torch-eager", "torch-eager-bf16")
CPU_ONLY = ("numpy", "sklearn-BernoulliRBM.gibbs", "zoo-f32-xla", "matmul-ceiling-native")  # on an accelerator zoo-f32 is the XLA scan
ACCELERATOR_ONLY = ("matmul-ceiling-bf16", "torch-eager-bf16", "zoo-bf16-cublas")  # bf16 is emulated (slow) on AVX2 CPUs
PAUSE_S = 0.3


def make_params(V, H, seed=0):
    r = np.random.default_rng(seed)
    return {"W": r.normal(0, 0.05, (V, H)).astype(np.float32), "b": r.normal(0, 0.1, V).astype(np.float32),
            "c": r.normal(0, 0.1, H).astype(np.float32)}


def numpy_chain(params, v, K, rng):
    """The straightforward NumPy chain: K sweeps of matmul, sigmoid, uniform < p."""
    W, b, c = params["W"], params["b"], params["c"]
    for _ in range(K):
        h = (rng.random((len(v), W.shape[1]), dtype=np.float32) < 1 / (1 + np.exp(-(v @ W + c)))).astype(np.float32)
        v = (rng.random(v.shape, dtype=np.float32) < 1 / (1 + np.exp(-(h @ W.T + b)))).astype(np.float32)
    return v


def _zoo(params, v0, K, compiler_options=None, **opts):
    p, v0 = jax.tree.map(jnp.asarray, params), jnp.asarray(v0)
    f = jax.jit(lambda key, p, v: gibbs.run_chain(key, p, v, K, **opts), compiler_options=compiler_options)
    key = jax.random.PRNGKey(0)
    return lambda: f(key, p, v0).block_until_ready()


def _ceiling(params, v0, K, dtype=jnp.float32):
    def chain(W, v):
        def body(v, _):
            h = (jnp.dot(v, W, preferred_element_type=jnp.float32) >= 0).astype(v.dtype)
            return (jnp.dot(h, W.T, preferred_element_type=jnp.float32) >= 0).astype(v.dtype), None
        return jax.lax.scan(body, v, None, length=K)[0]

    f, W, v0 = jax.jit(chain), jnp.asarray(params["W"], dtype), jnp.asarray(v0, dtype)
    return lambda: f(W, v0).block_until_ready()


def _native_ceiling(params, v0, K):
    """The C++ kernel's GEMMs alone (CPU): the chain with a `>= 0` threshold for its sampling."""
    from zoo.ops import native

    if jax.default_backend() != "cpu" or not native.available():
        raise ImportError("the native kernels run on CPU only, and need a C++ compiler")
    B = v0.shape[0]
    seeds, rows = jnp.zeros((B, K, 2, 2), jnp.uint32), jnp.arange(B, dtype=jnp.uint32)
    p, v0 = jax.tree.map(jnp.asarray, params), jnp.asarray(v0)
    f = jax.jit(lambda p, v: native.gibbs_chain(v, seeds, rows, p["W"], p["b"], p["c"], gemm_only=True))
    return lambda: f(p, v0).block_until_ready()


def _numpy(params, v0, K):
    rng = np.random.default_rng(0)
    return lambda: numpy_chain(params, v0, K, rng)


def _sklearn(params, v0, K):
    from sklearn.neural_network import BernoulliRBM

    rbm = BernoulliRBM(n_components=params["W"].shape[1])
    rbm.components_, rbm.intercept_hidden_ = params["W"].T.copy(), params["c"].copy()
    rbm.intercept_visible_, rbm.random_state_ = params["b"].copy(), np.random.RandomState(0)

    def run():
        v = v0
        for _ in range(K):
            v = rbm.gibbs(v)
        return v

    return run


def _torch(params, v0, K, dtype="float32"):
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    W, b, c = (torch.as_tensor(params[k], device=dev).to(getattr(torch, dtype)) for k in ("W", "b", "c"))
    v0 = torch.as_tensor(v0, device=dev).to(getattr(torch, dtype))

    def run():
        v = v0
        for _ in range(K):
            h = torch.bernoulli(torch.sigmoid(v @ W + c))
            v = torch.bernoulli(torch.sigmoid(h @ W.T + b))
        if dev == "cuda":
            torch.cuda.synchronize()
        return v

    return run


MAKERS = {
    "zoo-f32": lambda p, v0, K: _zoo(p, v0, K),
    "zoo-f32-xla": lambda p, v0, K: _zoo(p, v0, K, implementation="xla"),
    "zoo-f32-threefry": lambda p, v0, K: _zoo(p, v0, K, uniforms="threefry"),
    "zoo-bf16": lambda p, v0, K: _zoo(p, v0, K, compute_dtype=jnp.bfloat16),
    # the same program with XLA's GEMMs through cuBLAS, not its Triton emitter (the option per
    # program): an A/B in one process of what XLA_FLAGS=--xla_gpu_enable_triton_gemm=false did to
    # the whole run on 2026-11-26 (4096x4096 1.26x -> 1.39x torch, runs a day apart)
    "zoo-bf16-cublas": lambda p, v0, K: _zoo(p, v0, K, compute_dtype=jnp.bfloat16,
                                             compiler_options={"xla_gpu_enable_triton_gemm": False}),
    "matmul-ceiling": _ceiling,
    "matmul-ceiling-native": _native_ceiling,
    "matmul-ceiling-bf16": lambda p, v0, K: _ceiling(p, v0, K, jnp.bfloat16),
    "numpy": _numpy,
    "sklearn-BernoulliRBM.gibbs": _sklearn,
    "torch-eager": _torch,
    "torch-eager-bf16": lambda p, v0, K: _torch(p, v0, K, "bfloat16"),
}


def bench_case(V, H, B, K, impls=IMPLS, *, rounds: int = 7) -> list[dict]:
    """Rows for one shape; `impls` may name a subset (unknown names raise KeyError)."""
    params = make_params(V, H)
    v0 = (np.random.default_rng(1).random((B, V)) < 0.5).astype(np.float32)
    on_accelerator = jax.default_backend() != "cpu"
    fns = {}
    for impl in impls:
        if (impl in CPU_ONLY and on_accelerator) or (impl in ACCELERATOR_ONLY and not on_accelerator):
            continue  # CPU peers are not the comparison on an accelerator
        try:
            fns[impl] = MAKERS[impl](params, v0, K)
        except ImportError:
            continue  # an optional peer that is not installed
        fns[impl]()  # compile / warm up
    # OpenBLAS's worker threads spin for a while after a NumPy call; the pause lets them go idle so
    # they do not steal the cores from whichever implementation runs next
    times = interleaved_times(fns, rounds, pause_s=0.0 if on_accelerator else PAUSE_S)
    case = f"{V}x{H}-B{B}-K{K}"
    return emit([{"case": case, "impl": impl, "value": B * K / statistics.median(t), "unit": "chain-steps/s"}
                 for impl, t in times.items()])


def run(quick: bool) -> list[dict]:
    rows = []
    for V, H, B, K in (QUICK if quick else FULL):
        rows += bench_case(V, H, B, K, rounds=5)
    return rows
