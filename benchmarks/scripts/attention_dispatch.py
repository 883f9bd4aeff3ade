"""Where the zoo's GPU attention loses to PyTorch's in `zoo bench attention` when the kernels do not.

On the 2026-11-27 H200 lease attention_plans.py showed JAX's and PyTorch's cuDNN attention running
the same cuDNN 9.19 engines at the same speed (S4096 forward 0.803 vs 0.804 ms; S16384 12.35 vs
12.82 ms), while `zoo bench attention` timed the zoo's forward at 0.86-0.90x PyTorch's (S16384:
~15.9 ms per call vs ~13.6). This times, in one process and interleaved, wall time per call over
n calls dispatched back to back then one wait (the benchmark's method) for: the zoo's auto
(jax.nn's cuDNN path, what the benchmark times), JAX's cuDNN called directly, and PyTorch's cuDNN
SDPA; then profiles three back-to-back calls of each JAX program: kernel time vs first kernel to
last says whether the device waits between or inside calls.
Run (GPU): python benchmarks/scripts/attention_dispatch.py; with
XLA_FLAGS=--xla_gpu_enable_command_buffer= for the same without XLA's CUDA graphs.
"""
import statistics
import time

import jax
import jax.numpy as jnp

from zoo.bench.profile import kernel_table
from zoo.ops.attention import dot_product_attention


def wall_per_call(run, n, rounds=7):
    run(n)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        run(n)
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def jax_runner(attn, q, k, v):
    f = jax.jit(attn)

    def run(n=1):
        out = None
        for _ in range(n):
            out = f(q, k, v)
        return jax.block_until_ready(out)

    return run


def main():
    import torch
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print("jax", jax.__version__, jax.devices(), "torch", torch.__version__, flush=True)
    B, N, D = 4, 16, 128
    for S in (4096, 16384):
        flops = 4.0 * B * N * S * S * D
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, (B, S, N, D), jnp.bfloat16) for key in keys)
        runs = {
            "zoo-auto": jax_runner(lambda q, k, v: dot_product_attention(q, k, v), q, k, v),
            "jax-nn-cudnn": jax_runner(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), q, k, v),
            "jax-cudnn-direct": jax_runner(lambda q, k, v: cudnn_attention(q, k, v, scale=D ** -0.5,
                                                                           mask_type=MaskType.NO_MASK), q, k, v),
        }
        tq, tk, tv = (torch.randn((B, N, S, D), device="cuda", dtype=torch.bfloat16) for _ in range(3))

        def torch_run(n=1):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                for _ in range(n):
                    torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
            torch.cuda.synchronize()

        runs["torch-cudnn"] = torch_run
        n = max(1, round(0.025 / (flops / 600e12)))
        per_call = {name: [] for name in runs}
        for _ in range(3):  # interleaved
            for name, run in runs.items():
                per_call[name].append(wall_per_call(run, n))
        for name, ts in per_call.items():
            t = statistics.median(ts)
            print(f"S{S} full fwd n={n}: {name:18s} {t * 1e3:8.3f} ms per call  {flops / t / 1e12:6.1f} TFLOP/s",
                  flush=True)
        for name in ("zoo-auto", "jax-cudnn-direct"):
            try:
                kernel_table(lambda: runs[name](3), calls=1, top=5, title=f"three back-to-back calls of {name} S{S}")
            except Exception as e:  # noqa: BLE001
                print(f"--- profile of {name} failed: {type(e).__name__}: {e}")
        print(jax.jit(lambda q, k, v: dot_product_attention(q, k, v)).lower(q, k, v).compile().as_text()[:3000]
              if S == 4096 else "", flush=True)


if __name__ == "__main__":
    main()
