"""zoo.ops.cudnn_direct on a lent GPU before anything else uses it: the build (timed), the load,
and one forward per case against JAX's own cuDNN call (the same kernel, through XLA). Exit 0
when it is available and agrees (with ZOO_CHECK_ENV_FILE set, `export ZOO_CUDNN_DIRECT=1` is
appended to that file, so zoo.ops.attention's auto takes the call for the rest of the lease);
1 when not (benchmarks/device.sh then turns it off for the rest of the lease with
ZOO_CUDNN_DIRECT=0, so auto runs JAX's cuDNN call as before it existed); a crash exits non-zero
too (device.sh then runs it again under cuda-gdb).
Run (GPU): python benchmarks/scripts/cudnn_direct_check.py"""
import os
import sys

import jax
import jax.numpy as jnp

from direct_call import ready
from zoo.ops import cudnn_direct
from zoo.ops.attention import dot_product_attention

# (B, N, K, S, D, causal): the benchmark's S1024 shapes, and grouped heads with T != S
CASES = ((4, 16, 16, 1024, 128, False), (4, 16, 16, 1024, 128, True), (2, 8, 2, 384, 64, True))


def main() -> int:
    if not ready(cudnn_direct, "cudnn-direct", "cuDNN"):
        return 1
    ok = True
    for B, N, K, S, D, causal in CASES:
        T = S if K == N else S // 2
        keys = jax.random.split(jax.random.key(S + causal), 3)
        q = jax.random.normal(keys[0], (B, T, N, D), jnp.bfloat16)
        k, v = (jax.random.normal(key, (B, S, K, D), jnp.bfloat16) for key in keys[1:])
        outs = {impl: jax.jit(lambda q, k, v, impl=impl: dot_product_attention(
            q, k, v, is_causal=causal, implementation=impl))(q, k, v).astype(jnp.float32)
            for impl in ("cudnn-direct", "cudnn")}
        err = float(jnp.max(jnp.abs(outs["cudnn-direct"] - outs["cudnn"])))
        scale = float(jnp.max(jnp.abs(outs["cudnn"])))
        good = err <= 1e-2 * max(scale, 1.0)
        ok &= good
        print(f"cudnn-direct: B{B} T{T} S{S} N{N} K{K} D{D} {'causal' if causal else 'full'}: max |direct - cudnn| "
              f"{err:.3g} (outputs up to {scale:.3g}) {'ok' if good else 'MISMATCH'}", flush=True)
    env_file = os.environ.get("ZOO_CHECK_ENV_FILE")
    if ok and env_file:  # device.sh sources it: auto takes the direct call for the rest of the lease
        with open(env_file, "a") as f:
            f.write("export ZOO_CUDNN_DIRECT=1\n")
        print("cudnn-direct: auto takes it for the rest of the lease (ZOO_CUDNN_DIRECT=1)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
