"""The Gibbs chain three ways, interleaved in one process: the XLA scan and the C++ kernel with its
float32 FMA GEMMs and with AMX bf16x3 (benchmarks/results/README.md "CPU Gibbs: a native chain";
the AMX row needs an AMX CPU). Run: python benchmarks/scripts/gibbs_methods.py."""
import jax, jax.numpy as jnp, numpy as np, statistics
from zoo.ops import gibbs
from zoo.bench import interleaved_times
for (V,H,B,K) in [(784,500,1024,20),(64,256,4096,50),(784,500,100,20),(64,100,256,20)]:
    r=np.random.default_rng(0)
    p={"W":jnp.asarray(r.normal(0,0.05,(V,H)),jnp.float32),"b":jnp.zeros(V),"c":jnp.zeros(H)}
    v=jnp.asarray((r.random((B,V))<0.5).astype(np.float32))
    fns={}
    for name,kw in [("xla",dict(implementation="xla")),("fma",dict(method="fma")),("amx",dict(method="amx"))]:
        if name=="xla": f=jax.jit(lambda p,key,v: gibbs.run_chain(key,p,v,K,implementation="xla"))
        else: f=jax.jit(lambda p,key,v,kw=kw: gibbs._native_chain(key,p,v,K,False,**kw))
        key=jax.random.PRNGKey(0); f(p,key,v).block_until_ready()
        fns[name]=lambda f=f: f(p,key,v).block_until_ready()
    t=interleaved_times(fns,9)
    print(f"{V}x{H} B{B} K{K}: "+"  ".join(f"{n} {statistics.median(x)*1e3:.2f} ms" for n,x in t.items()), flush=True)
