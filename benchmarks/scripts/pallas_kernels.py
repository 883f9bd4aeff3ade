"""zoo.ops's Pallas (Triton) kernels timed alone against the XLA forms they replace, at several
tilings: the numbers to pick each kernel's tiling by (set untuned, from no GPU measurement).

GPT-124M's step at B64 as the kernels see it (bf16):
- `ln-fwd`: add_layer_norm's forward, r and d [65536, 768] in, h and y out (+ 8 B per row of
  statistics); XLA's form is the add then the layer norm (zoo.ops.layer_norm, "xla");
- `ln-bwd`: its backward, h, y's gradient and h's gradient in, the input gradient out (+ the
  scale and bias gradients' partial sums); `ln-bwd3`: the same with y's gradient as three arrays
  (copies=3: the separate q/k/v projections' three input gradients, summed in the kernel); XLA's
  form is autodiff's backward of the "xla" form (with the three gradients summed first);
- `lse`: logsumexp over the logits [65536, 50304] (zoo.ops.logsumexp); XLA's form is
  jax.nn.logsumexp, two passes (row max, then the sum);
- `xent`: cross_entropy_and_grad over the same logits, the loss and d = softmax - onehot written
  out (GPTConfig.xent "fused"); XLA's form is logsumexp's two passes, then a pass writing d. The
  kernel reads each row twice, the second time from the L2 cache if the row is still there (a
  rate well above the others' says it was); the bytes counted are one read and one write;
- `mlp-dgelu`: matmul_gelu_grad (zoo.ops.matmul_gelu), the MLP's GELU backward inside the matmul
  [65536, 768] x [768, 3072] that makes its input; XLA's form is cuBLAS's matmul, then a pass
  reading its product and z to write dz and the column sums. A matmul: its line's TFLOP/s (of
  the 309 GFLOP) says how near cuBLAS's the Triton matmul runs.

Each (kernel, tiling) is checked against the XLA form, then all are timed in shuffled, interleaved
rounds (n calls dispatched back to back, one wait, per timing; medians), with the bytes each
kernel must move per second and its speed against the XLA form (paired, round by round).
Tilings: ln-fwd (rows per program, warps); ln-bwd (rows per step, steps per program, warps);
lse and xent (rows per program, columns per step, warps); mlp-dgelu (rows, columns, depth per
step, warps, stages). The first of each list is the default.
Run: python benchmarks/scripts/pallas_kernels.py [--quick] [--kernels mlp-dgelu,xent,lse,ln-fwd,ln-bwd,ln-bwd3]
(--quick, the default off a GPU: small shapes, the kernels in Pallas's interpreter, to check the
script; its times say nothing of a GPU's).
"""
import argparse
import contextlib
import statistics
import time

import jax
import jax.numpy as jnp

from zoo.bench import interleaved_times, paired_speedup
from zoo.ops import layer_norm as ln
from zoo.ops import logsumexp as lse
from zoo.ops import matmul_gelu as mg

LN_FWD_TILES = [(ln._ROWS_FWD, ln._WARPS_FWD), (1, 2), (2, 4), (8, 4), (4, 8), (8, 8), (16, 8)]
LN_BWD_TILES = [(ln._ROWS, ln._STEPS, ln._WARPS_BWD), (4, 8, 4), (4, 32, 4), (8, 8, 8), (2, 32, 4), (8, 16, 8)]
# around the bests of the 2026-11-27 sweep (now the defaults), and the defaults before it
LSE_TILES = [lse.TILE, (4, 1024, 4), (1, 1024, 4), (1, 4096, 4), (2, 1024, 4), (1, 2048, 2), (1, 2048, 8)]
# that sweep: every step down from (1, 8192, 32) to (1, 1024, 4) ran faster; further down here
XENT_TILES = [lse.XENT_TILE, (1, 8192, 32), (1, 512, 4), (1, 512, 2), (1, 1024, 2), (1, 2048, 4), (2, 1024, 4)]
DGELU_TILES = [mg.TILE, (128, 128, 64, 4, 3), (64, 64, 64, 4, 4), (128, 64, 32, 4, 4), (128, 64, 64, 4, 3),
               (64, 128, 64, 4, 4), (256, 64, 64, 8, 4)]
# a lease's time limit cuts the last: the GELU-backward kernel (level with XLA's form at best) last
KERNELS = ("lse", "xent", "ln-fwd", "ln-bwd", "ln-bwd3", "mlp-dgelu")


@contextlib.contextmanager
def ln_tiles(fwd=None, bwd=None):
    """zoo.ops.layer_norm's tiling constants set while a program is traced and compiled (they are
    read as it is traced)."""
    saved = ln._ROWS_FWD, ln._WARPS_FWD, ln._ROWS, ln._STEPS, ln._WARPS_BWD
    try:
        if fwd:
            ln._ROWS_FWD, ln._WARPS_FWD = fwd
        if bwd:
            ln._ROWS, ln._STEPS, ln._WARPS_BWD = bwd
        yield
    finally:
        ln._ROWS_FWD, ln._WARPS_FWD, ln._ROWS, ln._STEPS, ln._WARPS_BWD = saved


def cases(kernel, M, H, V, dtype, quick):
    """{name: (program, args)} for one kernel: the XLA form first, then each tiling; and the
    bytes the kernel must move."""
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    normal = lambda i, shape: jax.random.normal(k[i], shape, dtype)  # noqa: E731
    arr = M * H * jnp.dtype(dtype).itemsize
    g, b = 1 + 0.1 * jax.random.normal(k[4], (H,)), 0.1 * jax.random.normal(k[5], (H,))
    out = {}
    if kernel == "ln-fwd":
        r, d = normal(0, (M, H)), normal(1, (M, H))
        out["xla"] = (jax.jit(lambda r, d: ln.add_layer_norm(r, d, g, b, implementation="xla")), (r, d))
        for t in LN_FWD_TILES[:1 if quick else None]:
            with ln_tiles(fwd=t):
                f = jax.jit(lambda r, d: ln._forward(r, d, g, b, 1e-5, jnp.dtype(dtype))[:2]).lower(r, d).compile()
            out[f"pallas {t}"] = (f, (r, d))
        return out, 4 * arr
    if kernel in ("ln-bwd", "ln-bwd3"):
        n = 3 if kernel == "ln-bwd3" else 1
        r, d, dh = normal(0, (M, H)), normal(1, (M, H)), normal(2, (M, H))
        dys = tuple(normal(3, (M, H)) * (i + 1) for i in range(n))
        h, _, mean, rstd = ln._forward(r, d, g, b, 1e-5, jnp.dtype(dtype))
        _, vjp = jax.vjp(lambda r, d, g, b: ln.add_layer_norm(r, d, g, b, implementation="xla", copies=n), r, d, g, b)
        out["xla"] = (jax.jit(lambda fn, dh, dys: (lambda o: (o[0], o[2], o[3]))(fn((dh, dys[0] if n == 1 else dys)))),
                      (vjp, dh, dys))
        for t in LN_BWD_TILES[:1 if quick else None]:
            with ln_tiles(bwd=t):
                f = jax.jit(lambda h, dys, dh, mean, rstd: ln._backward(h, dys, dh, g, mean, rstd, h.dtype)).lower(
                    h, dys, dh, mean, rstd).compile()
            out[f"pallas {t}"] = (f, (h, dys, dh, mean, rstd))
        return out, (2 + n) * arr + 8 * M
    if kernel == "mlp-dgelu":
        F = 4 * H
        gr, w, z = normal(0, (M, H)), normal(1, (F, H)) * 0.05, normal(2, (M, F))
        out["xla"] = (jax.jit(lambda g, w, z: mg.matmul_gelu_grad(g, w, z, implementation="xla")), (gr, w, z))
        for t in (DGELU_TILES if not quick else [(16, 16, 16, 1, 1)]):
            out[f"pallas {t}"] = (jax.jit(lambda g, w, z, t=t: mg.matmul_gelu_grad(
                g, w, z, implementation="pallas", tile=t)), (gr, w, z))
        return out, (M * H + F * H + 2 * M * F) * jnp.dtype(dtype).itemsize
    x = normal(0, (M, V)) * 3
    if kernel == "xent":
        y = jax.random.randint(k[1], (M,), 0, V)
        out["xla"] = (jax.jit(lambda x, y: lse.cross_entropy_and_grad(x, y, implementation="xla")), (x, y))
        for t in XENT_TILES[:1 if quick else None]:
            out[f"pallas {t}"] = (jax.jit(lambda x, y, t=t: lse.cross_entropy_and_grad(
                x, y, implementation="pallas", tile=t)), (x, y))
        return out, 2 * M * V * jnp.dtype(dtype).itemsize
    out["xla"] = (jax.jit(lambda x: lse.logsumexp(x, implementation="xla")), (x,))
    for t in LSE_TILES[:1 if quick else None]:
        out[f"pallas {t}"] = (jax.jit(lambda x, t=t: lse.logsumexp(x, implementation="pallas", tile=t)), (x,))
    return out, M * V * jnp.dtype(dtype).itemsize


def max_error(a, b):
    """max over the leaves of max |a - b| / max |b|, on the device (xent's d is 3.3 G elements: no
    host copy). Relative to each leaf's scale: a column sum over 65,536 rows of bf16 values carries
    rounding noise of a few units in absolute terms (the 2026-11-27 lease printed mlp-dgelu's 2.05
    and ln-bwd3's 5.29 absolute, the size of that noise on sums of ~200-1,000)."""
    rel = jax.jit(lambda x, y: jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))
                  / jnp.maximum(jnp.max(jnp.abs(y.astype(jnp.float32))), 1e-30))
    return max(float(rel(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (the default off a GPU)")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, among {', '.join(KERNELS)}")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    kernels = args.kernels.split(",")
    if bad := [k for k in kernels if k not in KERNELS]:
        parser.error(f"unknown kernels {bad}; known: {', '.join(KERNELS)}")
    on_gpu = jax.default_backend() == "gpu"
    quick = args.quick or not on_gpu
    M, H, V, dtype = (96, 48, 300, jnp.float32) if quick else (65536, 768, 50304, jnp.bfloat16)
    n = 2 if quick else 20  # calls per timing
    print(f"jax {jax.__version__} {jax.devices()[0].device_kind}: M {M}, H {H}, V {V}, {jnp.dtype(dtype).name}; "
          f"{n} calls per timing, {args.rounds} rounds", flush=True)
    failed = []
    for kernel in kernels:
        t0 = time.perf_counter()
        try:
            progs, moved = cases(kernel, M, H, V, dtype, quick)
        except Exception as e:  # noqa: BLE001 - a tiling that does not compile loses its kernel's line only
            failed.append(kernel)
            print(f"  FAILED {kernel}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}", flush=True)
            continue
        want = jax.block_until_ready(progs["xla"][0](*progs["xla"][1]))
        fns = {}
        for name, (prog, argv) in progs.items():
            try:
                got = jax.block_until_ready(prog(*argv))
            except Exception as e:  # noqa: BLE001 - a tiling that fails to compile or run: the others go on
                failed.append(f"{kernel} {name}")
                print(f"  FAILED {kernel} {name}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}",
                      flush=True)
                continue
            if name != "xla":
                print(f"  {kernel} {name}: max |difference| / max |xla|, worst output {max_error(got, want):.2e}", flush=True)

            def timed(prog=prog, argv=argv):
                r = None
                for _ in range(n):
                    r = prog(*argv)
                jax.block_until_ready(r)
            fns[name] = timed
        print(f"  {kernel}: compiled and checked in {time.perf_counter() - t0:.0f} s", flush=True)
        times = interleaved_times(fns, args.rounds, pause_s=0.02 if on_gpu else 0.0, order="shuffle")
        for name in fns:
            sec = statistics.median(times[name]) / n
            rate = f"  {2 * M * H * 4 * H / sec / 1e12:6.1f} TFLOP/s" if kernel == "mlp-dgelu" else ""
            print(f"{kernel:8s} {name:24s} {sec * 1e3:8.3f} ms  {moved / sec / 1e9:7.1f} GB/s of the kernel's "
                  f"{moved / 1e9:.2f} GB{rate}  speed vs xla (paired) {paired_speedup(times[name], times['xla']):.3f}",
                  flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"done in {time.perf_counter() - t0:.0f} s")
    raise SystemExit(rc)
