"""The MLP's bias + GELU, forward and backward, in four forms of the same function, timed alone.

GPT-124M's train step on an H200 (2026-11-27, bf16 logits, B64) spent 8.7 ms of its 114.6 ms of
kernels in two fusions of the MLP's GELU (tanh approximation): the forward (bias add + GELU,
3.7 ms) and the backward (GELU's derivative + the fc bias gradient, 5.0 ms). The next lease
(2026-11-27, thirteenth session) showed the backward's cost: XLA wrote the float32 y gradient
out (0.8 GB per layer) for a second fusion that read it back to sum the bias gradient and round
dy to bf16 (0.46 + 0.28 ms per layer). The forms, each [B * T, 3072] = y + bias, as the step's
MLP feeds them (y the fc matmul's output):

- `tanh-bf16`: the step's form until 2026-11-27, jax.nn.gelu in the compute dtype under
  jax.checkpoint (the bias added in bf16, every step of the formula rounded to bf16);
- `tanh-autodiff`: the same in float32 under jax.checkpoint, autodiff's derivative, the bias
  gradient summed from the float32 y gradient: the step's form until the thirteenth session;
- `tanh`: zoo.ops.gelu.bias_gelu_tanh, its derivative in closed form and the bias gradient
  the float32 sum of the y gradient as returned, read in bf16 (sum_rows_f32: no float32 array
  written for it);
- `sigmoid`: zoo.ops.gelu.bias_gelu_sigmoid, h * sigmoid(2 sqrt(2/pi) (h + 0.044715 h^3)),
  the same function without tanh (XLA's float32 tanh is a rational approximation), the bias
  gradient as `tanh`'s.

Each form's forward and its VJP (gradients of y and the bias) are timed in shuffled, interleaved
rounds (n calls dispatched back to back, one wait, per timing; medians), with the bytes each
moves per second and its speed against `tanh-autodiff` (paired, round by round), and checked
against a float64 NumPy GELU on a slice. On a GPU (bf16, [65536, 3072], GPT-124M at B64) each
form's kernels are listed too (ZOO_PROFILE=1): how many fusions the backward takes.
Run: python benchmarks/scripts/gelu_forms.py [--quick] [--dtype bfloat16]   (--quick, the default
off a GPU: [4096, 1024] float32, to check the script on a CPU, where the forms' times say nothing
of a GPU's).
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from zoo.bench import interleaved_times, paired_speedup, profile
from zoo.ops.gelu import bias_gelu_sigmoid, bias_gelu_tanh

FORMS = {
    "tanh-bf16": jax.checkpoint(lambda y, b: jax.nn.gelu(y + b.astype(y.dtype), approximate=True)),
    "tanh-autodiff": jax.checkpoint(lambda y, b: jax.nn.gelu(y.astype(jnp.float32) + b,
                                                             approximate=True).astype(y.dtype)),
    "tanh": bias_gelu_tanh,
    "sigmoid": bias_gelu_sigmoid,
}
BASE = "tanh-autodiff"  # the form the others' speeds are against


def reference(y, b, g):
    """GELU (tanh approximation), its gradient for upstream g, and the bias gradient, in float64."""
    h = np.asarray(y, np.float64) + np.asarray(b, np.float64)
    c, a = np.sqrt(2 / np.pi), 0.044715
    t = np.tanh(c * (h + a * h ** 3))
    dh = np.asarray(g, np.float64) * (0.5 * (1 + t) + 0.5 * h * (1 - t * t) * c * (1 + 3 * a * h * h))
    return 0.5 * h * (1 + t), dh, dh.sum(0)


def errors(fwd, vjp, y, b, g):
    """Largest error against the float64 reference on the first 256 rows: output and y's gradient
    relative to their largest magnitude, the bias gradient relative to its largest entry."""
    y, g = y[:256], g[:256]
    want_out, want_dy, want_db = reference(y, b, g)
    dy, db = vjp(y, b, g)
    rel = lambda got, want: float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())
    return rel(fwd(y, b), want_out), rel(dy, want_dy), rel(db, want_db)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="float32 [4096, 1024] (the default off a GPU)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="y's dtype (default: bfloat16 on a "
                        "GPU, float32 with --quick)")
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    quick = args.quick or not on_gpu
    M, F, dtype = (4096, 1024, jnp.float32) if quick else (65536, 3072, jnp.bfloat16)
    dtype = jnp.dtype(args.dtype or dtype)
    n = 5 if quick else 20  # calls per timing
    print(f"jax {jax.__version__} {jax.devices()[0].device_kind}: y, g [{M}, {F}] {jnp.dtype(dtype).name}, "
          f"bias [{F}] float32; {n} calls per timing, {args.rounds} rounds", flush=True)
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    y = jax.random.normal(k[0], (M, F), dtype)  # a matmul output of unit scale
    b = 0.1 * jax.random.normal(k[1], (F,), jnp.float32)
    g = 1e-3 * jax.random.normal(k[2], (M, F), dtype)
    itemsize = jnp.dtype(dtype).itemsize
    moved = {"fwd": 2 * M * F * itemsize, "vjp": 3 * M * F * itemsize}  # y in, out; y and g in, dy out

    fns, programs = {}, {}
    for name, f in FORMS.items():
        fwd = jax.jit(f)
        vjp = jax.jit(lambda y, b, g, f=f: jax.vjp(f, y, b)[1](g))
        out, dy, db = errors(fwd, vjp, y, b, g)
        print(f"  {name:13s} error vs float64: output {out:.1e}, y's gradient {dy:.1e}, bias gradient {db:.1e}",
              flush=True)
        for kind, prog, argv in (("fwd", fwd, (y, b)), ("vjp", vjp, (y, b, g))):
            jax.block_until_ready(prog(*argv))
            programs[name, kind] = lambda prog=prog, argv=argv: jax.block_until_ready(prog(*argv))

            def timed(prog=prog, argv=argv):
                r = None
                for _ in range(n):
                    r = prog(*argv)
                jax.block_until_ready(r)
            fns[name, kind] = timed
    times = interleaved_times(fns, args.rounds, pause_s=0.05 if on_gpu else 0.0, order="shuffle")
    for kind in ("fwd", "vjp"):
        base = times[BASE, kind]
        for name in FORMS:
            t = times[name, kind]
            sec = statistics.median(t) / n
            print(f"{kind} {name:13s} {sec * 1e3:8.3f} ms per call  {moved[kind] / sec / 1e9:7.1f} GB/s  "
                  f"speed vs {BASE} (paired) {paired_speedup(t, base):.3f}", flush=True)
    if on_gpu and profile.enabled():
        for (name, kind), fn in programs.items():
            profile.kernel_table(fn, calls=3, top=4, title=f"{kind} {name}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"done in {time.perf_counter() - t0:.0f} s")
