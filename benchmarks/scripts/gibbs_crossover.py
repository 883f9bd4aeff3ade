"""Native vs XLA Gibbs chains per call, interleaved in one process: the crossover table behind
zoo.ops.gibbs.CHAIN_NATIVE_MIN_* (benchmarks/results/README.md "CPU Gibbs: a native chain").
Run: python benchmarks/scripts/gibbs_crossover.py (CPU; ~2 minutes)."""
import jax, jax.numpy as jnp, numpy as np, statistics
from zoo.ops import gibbs
from zoo.bench import interleaved_times
for (V,H) in [(64,100),(784,500)]:
  for B in [32,100,256,1024]:
    for K in [1,5,20]:
        r=np.random.default_rng(0)
        p={"W":jnp.asarray(r.normal(0,0.05,(V,H)),jnp.float32),"b":jnp.zeros(V),"c":jnp.zeros(H)}
        v=jnp.asarray((r.random((B,V))<0.5).astype(np.float32))
        fns={}
        for impl in ["xla","native"]:
            f=jax.jit(lambda p,key,impl=impl: gibbs.run_chain(key,p,v,K,implementation=impl))
            key=jax.random.PRNGKey(0); f(p,key).block_until_ready()
            fns[impl]=lambda f=f: f(p,key).block_until_ready()
        t=interleaved_times(fns,15)
        a,b=(statistics.median(t[n]) for n in ("xla","native"))
        print(f"{V}x{H} B{B} K{K}: xla {a*1e3:.2f} ms native {b*1e3:.2f} ms  native/xla speedup {a/b:.2f}", flush=True)
