"""Which cuDNN kernels each side of the GPU attention benchmark runs, and for how long.

On the 2026-11-26 H200 leases the zoo's cuDNN attention (JAX, inputs [B, T, N, D]) ran at
0.81-0.88x PyTorch's cuDNN SDPA (inputs [B, N, S, D]) from S4096 on, and JAX's cuDNN on inputs
already head major 5-17% faster than on the zoo's layout. This profiles one call of each of: JAX
cuDNN on [B, T, N, D] ("BTNH", what auto runs), JAX cuDNN on [B, N, T, D] ("BNTH"), PyTorch cuDNN
SDPA on contiguous [B, N, S, D], and PyTorch cuDNN SDPA on [B, N, S, D] views of [B, S, N, D]
memory, at B4 N16 D128 bf16, forward and forward+backward, and prints each call's kernels (name,
ms): the same kernel names at different times say the layout costs (strided tile loads); different
kernel names (the engine's knob, its tile shape) say each side's cuDNN picks another plan.
Last, the GPT-124M train step's attention (B64 N12 T1024 D64, causal): whether the GPT's q, k, v
should leave their projection head major (an einsum can write either layout at no cost).
Run on a GPU machine with jax[cuda] and torch: python benchmarks/scripts/attention_plans.py
(benchmarks/device.sh part a runs it). Environment: ZOO_PLAN_LENGTHS=4096,16384 (default).
"""
import os

import jax
import jax.numpy as jnp

from zoo.bench.profile import kernel_table

LENGTHS = [int(s) for s in os.environ.get("ZOO_PLAN_LENGTHS", "4096,16384").split(",")]
CASES = [(4, 16, S, 128, False) for S in LENGTHS] + [(64, 12, 1024, 64, True)]  # B, N, S, D, causal


def jax_call(layout, B, N, S, D, causal, backward):
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    shape = (B, S, N, D) if layout == "BTNH" else (B, N, S, D)
    q, k, v, do = (jax.random.normal(key, shape, jnp.bfloat16) for key in jax.random.split(jax.random.key(0), 4))
    mask_type = MaskType.CAUSAL if causal else MaskType.NO_MASK
    attn = lambda q, k, v: cudnn_attention(q, k, v, scale=D ** -0.5, mask_type=mask_type,
                                           qkv_layout=layout)
    one = (lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do)) if backward else (lambda q, k, v, do: attn(q, k, v))
    f = jax.jit(one)
    run = lambda: jax.block_until_ready(f(q, k, v, do))
    run()
    return run


def torch_table(B, N, S, D, causal, backward, zoo_layout):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda: (torch.randn((B, S, N, D), generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                    if zoo_layout else torch.randn((B, N, S, D), generator=g, device="cuda", dtype=torch.bfloat16))
    q, k, v, do = (make().requires_grad_(backward) for _ in range(4))

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            if backward:
                torch.autograd.grad(o, (q, k, v), do)
        torch.cuda.synchronize()

    for _ in range(2):
        run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            run()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if us:
            rows.append((us / 3 / 1e3, e.key))
    rows.sort(reverse=True)
    print(f"--- torch cuDNN SDPA {'[B, N, S, D] views of [B, S, N, D]' if zoo_layout else '[B, N, S, D]'}: "
          f"{sum(ms for ms, _ in rows):.3f} ms per call", flush=True)
    for ms, name in rows[:6]:
        print(f"  {ms:9.3f} ms {name[:120]}", flush=True)


def main():
    # every JAX profile first: once PyTorch's profiler has run, JAX's trace (2026-11-27 H200) held
    # host events only
    print("jax", jax.__version__, jax.devices())
    cases = [(c, backward) for c in CASES for backward in (False, True)]
    title = lambda B, N, S, D, causal, backward: (f"B{B} N{N} S{S} D{D} bf16 {'causal' if causal else 'full'} "
                                                  f"{'fwd+bwd' if backward else 'fwd'}")
    for (B, N, S, D, causal), backward in cases:
        print(f"=== {title(B, N, S, D, causal, backward)}", flush=True)
        for layout in ("BTNH", "BNTH"):
            try:
                kernel_table(jax_call(layout, B, N, S, D, causal, backward), calls=3, top=6,
                             title=f"JAX cuDNN {layout}")
            except Exception as e:  # noqa: BLE001 - a diagnostic: say why and go on
                print(f"--- JAX cuDNN {layout} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    for (B, N, S, D, causal), backward in cases:
        print(f"=== {title(B, N, S, D, causal, backward)}", flush=True)
        for zoo_layout in (False, True):
            try:
                torch_table(B, N, S, D, causal, backward, zoo_layout)
            except Exception as e:  # noqa: BLE001
                print(f"--- torch cuDNN failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


if __name__ == "__main__":
    main()
