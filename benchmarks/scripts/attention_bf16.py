"""bfloat16 attention on CPU, B1 N8 D64, S 1024 / 4096, full and causal, forward and forward +
backward: the native kernel on Intel AMX, the same kernel with its inputs widened to float32
(ZOO_NATIVE_AMX=0, read on each call: what bf16 ran as before the AMX kernels), PyTorch SDPA in
bf16, and both in float32, interleaved in one process (benchmarks/results/README.md "CPU attention: a bfloat16 forward on
AMX"). Run: python benchmarks/scripts/attention_bf16.py (needs torch, the peers extra)."""
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import torch

from zoo.bench import interleaved_times
from zoo.ops import attention as A

rng = np.random.default_rng(0)
B, N, D = 1, 8, 64
for S in (1024, 4096):
    for causal in (False, True):
        for backward in (False, True):
            q, k, v = (rng.standard_normal((B, S, N, D)).astype(np.float32) for _ in range(3))
            fns = {}
            for dt in ("float32", "bfloat16"):
                jq, jk, jv = (jnp.asarray(x, dt) for x in (q, k, v))
                attend = lambda a, b, c: A.dot_product_attention(a, b, c, is_causal=causal)
                if backward:
                    f = jax.jit(jax.grad(lambda a, b, c: jnp.sum(attend(a, b, c).astype(jnp.float32) ** 2), (0, 1, 2)))
                else:
                    f = jax.jit(attend)
                jax.block_until_ready(f(jq, jk, jv))

                def zoo(f=f, a=jq, b=jk, c=jv, amx="1"):
                    os.environ["ZOO_NATIVE_AMX"] = amx
                    jax.block_until_ready(f(a, b, c))

                fns["zoo-" + dt] = zoo
                if dt == "bfloat16":
                    fns["zoo-bfloat16-widened"] = lambda zoo=zoo: zoo(amx="0")
                tq, tk, tv = (torch.tensor(x).transpose(1, 2).contiguous().to(getattr(torch, dt)).requires_grad_(backward)
                              for x in (q, k, v))

                def peer(tq=tq, tk=tk, tv=tv):
                    with torch.set_grad_enabled(backward):
                        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
                        if backward:
                            (o.float() ** 2).sum().backward()

                peer()
                fns["torch-" + dt] = peer
            times = interleaved_times(fns, 7, pause_s=0.05, warm_below_s=0.25)
            os.environ.pop("ZOO_NATIVE_AMX")
            flops = 4 * B * N * S * S * D / (2 if causal else 1) * (3.5 if backward else 1)
            gf = {name: flops / statistics.median(t) / 1e9 for name, t in times.items()}
            print(f"S{S} {'causal' if causal else 'full'} {'fwd+bwd' if backward else 'fwd'} GFLOP/s:",
                  ", ".join(f"{name} {x:.0f}" for name, x in gf.items()),
                  f"| bf16 zoo / torch {gf['zoo-bfloat16'] / gf['torch-bfloat16']:.2f}, widened / torch "
                  f"{gf['zoo-bfloat16-widened'] / gf['torch-bfloat16']:.2f}", flush=True)
print("jax", jax.__version__, "torch", torch.__version__, "device", jax.devices()[0].device_kind)
