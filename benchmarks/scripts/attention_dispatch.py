"""Where the zoo's GPU attention loses to PyTorch's in `zoo bench attention` when the kernels do not.

On the 2026-11-27 H200 lease attention_plans.py showed JAX's and PyTorch's cuDNN attention running
the same cuDNN 9.19 engines at the same speed (S4096 forward 0.803 vs 0.804 ms; S16384 12.35 vs
12.82 ms), while `zoo bench attention` timed the zoo's forward at 0.86-0.90x PyTorch's (S16384:
~15.9 ms per call vs ~13.6). This times, in one process and interleaved, wall time per call over
n calls dispatched back to back then one wait (the benchmark's method) for: the zoo's auto (what
the benchmark times: on a GPU its forward is zoo.ops.cudnn_direct's call where that builds),
the zoo's "cudnn" (jax.nn's cuDNN path, through XLA's cuDNN thunk), JAX's cuDNN function called
without jax.nn, and PyTorch's cuDNN SDPA; then profiles three back-to-back calls of each JAX program: kernel time vs first kernel to
last says whether the device waits between or inside calls.
The thirteenth session's lease (2026-11-27) left the S1024 forwards as the gap (0.84x full, 0.79x
causal), where the zoo's program runs three memsets per attention call to PyTorch's one (1 us);
`--seqs 1024 --causal` times those, lists the memsets by size (zoo.bench.profile.memsets) and,
with --hlo-dir, writes each S's compiled program (what XLA zeroes: a memset is a fusion or a
thunk of the program).
Run (GPU): python benchmarks/scripts/attention_dispatch.py [--seqs 1024,4096] [--causal]
[--hlo-dir DIR]; with XLA_FLAGS=--xla_gpu_enable_command_buffer= for the same without XLA's CUDA
graphs. Off a GPU (a check of the script: `--seqs 64 --shape 1,2,16`) JAX's cuDNN calls are
reported unavailable, PyTorch's SDPA runs its default backend, and no kernel table is taken.
"""
import argparse
import gzip
import os
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


def torch_runner(torch, shape, causal):
    """n calls of PyTorch's SDPA on [B, N, S, D] inputs, then one synchronize: cuDNN's on a GPU,
    the default backend elsewhere (a CPU check of the script)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.cuda.is_available()
    tq, tk, tv = (torch.randn(shape, device="cuda" if cuda else "cpu", dtype=torch.bfloat16) for _ in range(3))

    def run(n=1):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if cuda else contextlib.nullcontext():
            for _ in range(n):
                torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        if cuda:
            torch.cuda.synchronize()

    return ("torch-cudnn" if cuda else "torch-sdpa"), run


def positive_ints(n=None):
    """argparse type: a comma list of positive integers (exactly n of them when n is given)."""
    def parse(text):
        try:
            values = [int(x) for x in text.split(",")]
        except ValueError:
            values = []
        if not values or min(values) < 1 or (n is not None and len(values) != n):
            raise argparse.ArgumentTypeError(f"expected {n or 'one or more'} positive integers, comma-separated; "
                                             f"got {text!r}")
        return values
    return parse


def main():
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=positive_ints(), default="4096,16384",
                        help="sequence lengths, comma-separated")
    parser.add_argument("--causal", action="store_true", help="causal attention (FLOPs counted in full, as the "
                        "benchmark's)")
    parser.add_argument("--hlo-dir", default=None, help="write the zoo's compiled program per S here (gzip)")
    parser.add_argument("--shape", type=positive_ints(3), default="4,16,128",
                        help="B,N,D (the benchmark's: 4,16,128)")
    args = parser.parse_args()
    try:  # after the arguments: a bad one is refused without the import's seconds
        import torch
    except ImportError:
        torch = None
    causal = args.causal
    mask = "causal" if causal else "full"
    print("jax", jax.__version__, jax.devices(), "torch", torch.__version__ if torch else "(not installed)", flush=True)
    B, N, D = args.shape
    for S in args.seqs:
        flops = 4.0 * B * N * S * S * D
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(key, (B, S, N, D), jnp.bfloat16) for key in keys)
        zoo = lambda q, k, v: dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
        runs = {
            "zoo-auto": jax_runner(zoo, q, k, v),
            "zoo-cudnn": jax_runner(lambda q, k, v: dot_product_attention(
                q, k, v, is_causal=causal, implementation="cudnn"), q, k, v),
            "jax-cudnn-private": jax_runner(lambda q, k, v: cudnn_attention(
                q, k, v, scale=D ** -0.5, mask_type=MaskType.CAUSAL if causal else MaskType.NO_MASK), q, k, v),
        }
        if torch is not None:
            name, runs[name] = torch_runner(torch, (B, N, S, D), causal)
        for name, run in list(runs.items()):  # e.g. JAX's cuDNN calls off a GPU
            try:
                run(1)
            except Exception as e:  # noqa: BLE001
                print(f"S{S} {mask} fwd: {name} unavailable ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                del runs[name]
        n = min(2000, max(1, round(0.025 / (flops / 600e12))))  # ~25 ms of calls at 600 TFLOP/s
        per_call = {name: [] for name in runs}
        for _ in range(3):  # interleaved
            for name, run in runs.items():
                per_call[name].append(wall_per_call(run, n))
        for name, ts in per_call.items():
            t = statistics.median(ts)
            print(f"S{S} {mask} fwd n={n}: {name:18s} {t * 1e3:8.3f} ms per call  {flops / t / 1e12:6.1f} TFLOP/s",
                  flush=True)
        for name in ("zoo-auto", "zoo-cudnn"):
            if name not in runs or jax.default_backend() != "gpu":
                continue
            try:
                kernel_table(lambda: runs[name](3), calls=1, top=5,
                             title=f"three back-to-back calls of {name} S{S} {mask}")
            except Exception as e:  # noqa: BLE001
                print(f"--- profile of {name} failed: {type(e).__name__}: {e}")
        if args.hlo_dir:
            os.makedirs(args.hlo_dir, exist_ok=True)
            path = os.path.join(args.hlo_dir, f"attention-S{S}-{mask}-fwd.hlo.txt.gz")
            with gzip.open(path, "wt") as f:
                f.write(jax.jit(zoo).lower(q, k, v).compile().as_text())
            print(f"--- compiled program written to {path}", flush=True)


if __name__ == "__main__":
    main()
