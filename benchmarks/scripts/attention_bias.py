"""ALiBi-biased causal attention on CPU, B1 N8 T1024 D64: the native kernel, "chunked" with query
blocks (auto's choice for a bias before) and PyTorch SDPA with the bias as a float mask, interleaved
in one process (benchmarks/results/README.md "CPU attention: a bias in the native kernel").
Run: python benchmarks/scripts/attention_bias.py (needs torch, the peers extra)."""
import jax, jax.numpy as jnp, numpy as np, statistics, torch
from zoo.ops import attention as A
from zoo.bench import interleaved_times
r=np.random.default_rng(0)
B,T,N,D=1,1024,8,64
q,k,v=(jnp.asarray(r.standard_normal((B,T,N,D)),jnp.float32) for _ in range(3))
slopes=2.0**(-8*np.arange(1,N+1)/N)
bias=jnp.asarray((-slopes[:,None,None]*np.abs(np.arange(T)[:,None]-np.arange(T)[None,:]))[None],jnp.float32)  # ALiBi [1,N,T,T]
fns={}
for impl in ["native","chunked-cpu"]:
    def f(q,k,v,b,impl=impl):
        if impl=="chunked-cpu":
            return A.chunked.chunked(q,k,v,b,None,True,None,1/8,A.CPU_BLOCKS[1],A.CPU_BLOCKS[0])
        return A.dot_product_attention(q,k,v,bias=b,is_causal=True,implementation=impl)
    fw=jax.jit(f); bw=jax.jit(jax.grad(lambda q,k,v,b: jnp.sum(f(q,k,v,b)**2),(0,1,2)))
    fw(q,k,v,bias).block_until_ready(); jax.block_until_ready(bw(q,k,v,bias))
    fns[impl+"-fwd"]=lambda fw=fw: fw(q,k,v,bias).block_until_ready()
    fns[impl+"-fwdbwd"]=lambda bw=bw: jax.block_until_ready(bw(q,k,v,bias))
tq,tk,tv=(torch.tensor(np.asarray(x)).transpose(1,2).contiguous() for x in (q,k,v))
tb=torch.tensor(np.asarray(bias))+torch.triu(torch.full((T,T),float('-inf')),1)
tq.requires_grad_(); tk.requires_grad_(); tv.requires_grad_()
F=torch.nn.functional.scaled_dot_product_attention
def tf():
    with torch.no_grad(): F(tq,tk,tv,attn_mask=tb)
def tfb():
    o=F(tq,tk,tv,attn_mask=tb); (o**2).sum().backward()
fns["torch-fwd"]=tf; fns["torch-fwdbwd"]=tfb
t=interleaved_times(fns,7)
for n,x in t.items(): print(f"{n:20s} {statistics.median(x)*1e3:8.1f} ms")
