"""zoo.ops.cublaslt on a lent GPU before anything else uses it: the build (timed), the load, the
MLP's GELU backward by cuBLASLt's DGELU_BGRAD epilogue against float64 from the same bf16 inputs
(GPT-124M's widths, 4,096 rows), and at GPT-124M's B64 shape (65,536 rows) its time beside XLA's
form and the Pallas kernel (medians of 20 calls, each form's in one jitted loop). Exit 0 when it
is available and agrees, 1 when not (benchmarks/device.sh then turns it off for the rest of the
lease with ZOO_CUBLASLT=0, so the gpt_step runs that use it lose their own rows only); a crash
exits non-zero too.
Run (GPU): python benchmarks/scripts/cublaslt_check.py"""
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from direct_call import ready
from zoo.ops import cublaslt
from zoo.ops.matmul_gelu import gelu_tanh_grad, matmul_gelu_grad

# rows checked against float64, and timed (GPT-124M at B64); the widths GPT-124M's MLP's
CHECK_ROWS, TIME_ROWS, K, N = 4096, 65536, 768, 3072


def _inputs(M, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (M, K), jnp.bfloat16),
            (0.3 * jax.random.normal(keys[1], (N, K))).astype(jnp.bfloat16),
            (2.0 * jax.random.normal(keys[2], (M, N))).astype(jnp.bfloat16))


def _time(impl, args, calls=20, rounds=7):
    f = jax.jit(lambda g, w, z: jax.lax.fori_loop(0, calls, lambda i, acc: acc + matmul_gelu_grad(
        g, w, z, implementation=impl)[1][0], jnp.float32(0)))
    f(*args).block_until_ready()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        f(*args).block_until_ready()
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times)


def main() -> int:
    if not ready(cublaslt, "cublaslt", "cuBLASLt"):
        return 1
    M = CHECK_ROWS
    g, w, z = _inputs(M)
    dz, db = jax.jit(lambda g, w, z: matmul_gelu_grad(g, w, z, implementation="cublaslt"))(g, w, z)
    ref = (np.asarray(g, np.float64) @ np.asarray(w, np.float64).T
           * np.asarray(gelu_tanh_grad(jnp.asarray(z, jnp.float32)), np.float64))
    dz, db = np.asarray(dz, np.float64), np.asarray(db, np.float64)
    # dz within one bf16 rounding of float64 (1e-3 absolute where it is near 0); the column sums
    # within a bf16 rounding and 3x the rounding noise of M sums of rounded values
    excess = float(np.max(np.abs(dz - ref) - 1.1 * 2.0**-8 * np.abs(ref)))
    noise = np.sqrt(M) * np.sqrt(np.mean(ref**2)) * 2.0**-8
    sums = float(np.max(np.abs(db - ref.sum(0)) / (noise + 2.0**-8 * np.abs(ref.sum(0)))))
    ok = excess <= 1e-3 and sums <= 3.0
    print(f"cublaslt: M{M} K{K} N{N} bf16: dz off float64 by at most one bf16 rounding + {max(excess, 0):.3g} "
          f"(allowed 1e-3), column sums up to {sums:.3g}x their rounding noise {'ok' if ok else 'MISMATCH'}",
          flush=True)
    if not ok:
        return 1
    args = _inputs(TIME_ROWS)
    ms = {}
    for impl in ("xla", "cublaslt", "pallas"):
        try:
            ms[impl] = _time(impl, args) * 1e3
        except Exception as e:  # noqa: BLE001 - a form that fails here loses its own row
            print(f"cublaslt: {impl} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    flop = 2 * TIME_ROWS * N * K
    print(f"cublaslt: M{TIME_ROWS} K{K} N{N} bf16 (GPT-124M B64, per layer): " + ", ".join(
        f"{k} {v:.3f} ms ({flop / v / 1e9:.0f} TFLOP/s)" for k, v in ms.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
