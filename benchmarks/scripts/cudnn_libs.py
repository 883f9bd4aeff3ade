"""Which cuDNN each side of the attention benchmark runs (for a lent GPU; device.sh prints it first).

JAX's cuDNN attention and PyTorch's cuDNN SDPA were 0.83-0.94x apart in the forward on the
2026-11-26 H200 leases (benchmarks/results/README.md). This prints the cuDNN version each library
reports, runs one small cuDNN attention on each side in this one process, and then lists every
libcudnn file the process has mapped: one path means both run the same library (the gap is in the
plans), two mean each loaded its own (a version difference could be the gap).
Run: python benchmarks/scripts/cudnn_libs.py (a GPU machine with jax[cuda] and torch)."""
import jax
import jax.numpy as jnp

from jax._src.lib import cuda_versions

print("jax", jax.__version__, "cuDNN (JAX's build reports)",
      cuda_versions.cudnn_get_version() if cuda_versions else "no CUDA plugin")
try:
    import torch
except ImportError:
    torch = None
if torch is not None:
    print("torch", torch.__version__, "cuDNN", torch.backends.cudnn.version(), "CUDA", torch.version.cuda)
q = jnp.ones((1, 256, 4, 128), jnp.bfloat16)
try:  # each side's failure is printed, and the library listing still comes
    print("JAX cuDNN attention:", jax.nn.dot_product_attention(q, q, q, implementation="cudnn").shape)
except Exception as e:  # noqa: BLE001
    print("JAX cuDNN attention failed:", type(e).__name__, str(e).splitlines()[0][:200])
if torch is not None:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        t = torch.ones((1, 4, 256, 128), dtype=torch.bfloat16, device="cuda")
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            print("torch cuDNN SDPA:", tuple(torch.nn.functional.scaled_dot_product_attention(t, t, t).shape))
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        print("torch cuDNN SDPA failed:", type(e).__name__, str(e).splitlines()[0][:200])
with open("/proc/self/maps") as f:
    libs = sorted({line.split()[-1] for line in f if "libcudnn" in line})
print("libcudnn files mapped:", *libs, sep="\n  ")
