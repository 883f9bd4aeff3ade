# Ran on a lent H200 (2026-11-26) at acead7b, where zoo.ops.attention still had implementation="mosaic"
# (removed after this measurement). Output: fa3-vs-cudnn-gpu-2026-11-26.log.
import inspect, statistics, time, types, functools, sys
import numpy as np, jax, jax.numpy as jnp
import jax.experimental.pallas.ops.gpu.attention_mgpu as m
import zoo.ops.attention as za

src = inspect.getsource(m)
i = src.index("  def entry(q_ref, k_ref, v_ref, out_ref, lse_ref):")
j = src.index("pl.run_scoped(", i)
assert src[i:j].count("jnp.float16,") == 3
patched_src = src[:i] + src[i:j].replace("jnp.float16,", "dtype,") + src[j:]
pm = types.ModuleType("attention_mgpu_patched"); pm.__dict__.update({"__name__": "attention_mgpu_patched"})
exec(compile(patched_src, "attention_mgpu_patched", "exec"), pm.__dict__)
za._fa3_module = lambda: pm

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

def med(call, sync, n=20, reps=7):
    sync(call())
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n): out = call()
        sync(out); ts.append((time.perf_counter() - t) / n)
    return statistics.median(ts)

B, N, D = 4, 16, 128
for S in (4096, 8192, 2048):
    for causal in (False, True):
        for dt in ("bfloat16", "float16"):
            flops = 4 * B * N * S * S * D / (2 if causal else 1)
            ks = jax.random.split(jax.random.key(S), 3)
            q, k, v = (jax.random.normal(kk, (B, S, N, D), dt) for kk in ks)
            res = {}
            outs = {}
            for impl in ("mosaic", "cudnn"):
                f = jax.jit(functools.partial(za.dot_product_attention, is_causal=causal, implementation=impl))
                try:
                    outs[impl] = np.asarray(f(q, k, v), np.float32)
                    res["zoo-" + impl] = flops / med(lambda: f(q, k, v), jax.block_until_ready) / 1e12
                except Exception as e:
                    res["zoo-" + impl] = f"FAIL {type(e).__name__}: {str(e)[:150]}"
            if "mosaic" in outs:
                a, b = outs["mosaic"], outs["cudnn"]
                res["relerr"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
            tq, tk, tv = (torch.as_tensor(np.asarray(x.astype(jnp.float32))).to("cuda", getattr(torch, dt)).transpose(1, 2).contiguous() for x in (q, k, v))
            for name, be in (("torch-cudnn", SDPBackend.CUDNN_ATTENTION), ("torch-flash", SDPBackend.FLASH_ATTENTION)):
                with sdpa_kernel(be):
                    res[name] = flops / med(lambda: sdpa(tq, tk, tv, is_causal=causal), lambda o: torch.cuda.synchronize()) / 1e12
            print(f"S{S} causal={causal} {dt}: " + "  ".join(f"{k}={v:.1f}" if isinstance(v, float) and k != "relerr" else f"{k}={v}" for k, v in res.items()), flush=True)
