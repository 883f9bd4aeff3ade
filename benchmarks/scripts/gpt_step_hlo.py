"""GPT-124M's train step (zoo bench gpt_step) compiled for an H200 or H100 on this machine, without
one, and what each compiled program moves: where a change to the model saves kernel time,
before a lease spends device time on it.

For each run (gpt_step's names: bf16-logits, bf16-logits-gelu-sigmoid, ...) XLA's GPU compiler
builds the step at B64 as the device would (zoo.bench.hlo.compile_for_gpu: JAX's CUDA plugin, no
GPU, no autotuning), and zoo.bench.hlo.launches reads off each kernel it launches: the matmuls'
TFLOP, the bytes each fusion reads and writes, the cuDNN attention calls. The estimate of kernel
time per step takes the rates the thirteenth session's lease measured for the bf16-logits step
(H200, 2026-11-27: 121.4 ms of kernels, its compiled program read the same way): matmuls at 755
TFLOP/s (53% of the kernel time for 48.6 TFLOP), fusions and copies at 3.17 TB/s (35% for 134.9
GB), attention 15.2 ms (12%, for 14.57 GB of cuDNN's inputs and outputs: other shapes scaled by
theirs); a Pallas kernel with a matmul inside (zoo.ops.matmul_gelu) the longer of its matmul at
the matmuls' rate and its bytes at the fusions' (as if the Triton matmul kept up with cuBLAS's).
A guide to which way and about how far a change moves the step,
not a measurement: the same card ran the same step 5% faster on another lease. Each run's line
ends with the memory its temporaries take on the device (XLA's buffer assignment, one
allocation: the bf16-logits step at B128 reads 61.6 GiB at this commit; an H200 lease asked for
61.5 GiB for that step as the code stood on 2026-11-26, and was refused in a process that had
run the B64 steps before).

Run: python benchmarks/scripts/gpt_step_hlo.py [--target h200] [--runs bf16-logits,...]
[--out DIR] (needs `pip install jax-cuda13-plugin==JAX jax-cuda13-pjrt==JAX`, JAX being jax's
version; the script runs JAX on the CPU, JAX_PLATFORMS=cpu). --out writes each run's compiled
program, gzipped.
"""
import argparse
import dataclasses
import gzip
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no GPU here: see zoo.bench.hlo.compile_for_gpu

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax

from zoo.bench import hlo
from zoo.bench.gpt_step import FULL, LR, PEERS, WEIGHT_DECAY, run_name
from zoo.models.gpt import make_gpt
from zoo.train.state import init_state
from zoo.train.strategy import make_train_step

# the thirteenth session's lease (see the module's note)
GEMM_TFLOPS, FUSION_TBPS, ATTENTION_MS, ATTENTION_GB = 755.0, 3.17, 15.2, 14.57


def step_program(cfg, B: int, target: str, options: dict | None = None):
    """The train step of GPT cfg at batch B compiled for `target` (a jax.stages.Compiled)."""
    md = make_gpt(cfg)
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    batch = {"x": jax.ShapeDtypeStruct((B, cfg.max_len + 1), jnp.int32), "idx": jax.ShapeDtypeStruct((B,), jnp.int32)}
    with hlo.tracing_for_gpu(target):
        state = jax.eval_shape(lambda k, b: init_state(md.init(k, b), tx, 0.0), jax.random.PRNGKey(0), batch)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(1))
    return hlo.compile_for_gpu(make_train_step(md, tx, 0.0), state, key, batch, target=target, donate_argnums=(0,),
                               compiler_options={**hlo.GPU_COMPILER_OPTIONS, **(options or {})})


def summary(ls: list[hlo.Launch]) -> dict:
    gemm = sum(x.flops for x in ls if x.kind == "gemm") / 1e12
    attention = [x for x in ls if x.kind == "attention"]
    attention_gb = sum(x.bytes for x in attention) / 1e9  # cuDNN's time scaled by its inputs and outputs
    moved = sum(x.bytes for x in ls if x.kind not in ("gemm", "attention")) / 1e9
    aux = sum(x.aux for x in ls) / 1e9  # a matmul epilogue's second output (GELU_AUX): as if a pass wrote it
    # a kernel of our own with a matmul inside (zoo.ops.matmul_gelu): the longer of its matmul at
    # cuBLAS's rate and its bytes at the fusions' (counted in fusion_gb, charged here instead)
    own = [x for x in ls if x.kind not in ("gemm", "attention") and x.flops]
    own_ms = sum(max(x.flops / 1e12 / GEMM_TFLOPS * 1e3, x.bytes / 1e9 / FUSION_TBPS) for x in own)
    own_gb = sum(x.bytes for x in own) / 1e9
    return {"launches": len(ls), "gemm_tflop": gemm, "fusion_gb": moved, "aux_gb": aux, "attention_calls": len(attention),
            "kernel_tflop": sum(x.flops for x in own) / 1e12,
            "estimate_ms": (gemm / GEMM_TFLOPS * 1e3 + (moved - own_gb + aux) / FUSION_TBPS + own_ms
                            + ATTENTION_MS * attention_gb / ATTENTION_GB)}


def _option(text: str) -> tuple:
    """"xla_a=true" -> ("xla_a", True): booleans and integers as XLA takes them, the rest strings."""
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("xla_"):
        raise argparse.ArgumentTypeError(f"{text!r}: want xla_NAME=VALUE")
    return name, {"true": True, "false": False}.get(value.lower(), int(value) if value.lstrip("-").isdigit() else value)


def main(argv=None) -> int:
    runs = {run_name(B, v): (B, v) for B, v in FULL["runs"] + FULL["more"] if not (v and v[0] in PEERS)}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="h200", choices=sorted(hlo.GPU_TARGETS))
    p.add_argument("--runs", default="64-bf16-logits,64-bf16-logits-gelu-sigmoid",
                   type=lambda s: [r if r[:1].isdigit() else f"64-{r}" for r in s.split(",") if r],
                   help=f"comma-separated, among: {', '.join(runs)} (the 64- may be left off)")
    p.add_argument("--xla", action="append", default=[], type=_option, metavar="NAME=VALUE",
                   help="an XLA option for every run, beside xla_gpu_enable_triton_gemm=false (e.g. "
                        "xla_gpu_experimental_enable_fusion_block_level_rewriter=true); repeat for more")
    p.add_argument("--out", help="write each run's compiled program here (gzipped)")
    p.add_argument("--top", type=int, default=12, help="sources listed for the first run")
    args = p.parse_args(argv)
    args.xla = dict(args.xla)
    unknown = [r for r in args.runs if r not in runs]
    if unknown:
        p.error(f"unknown runs {unknown}; known: {', '.join(runs)}")
    print(f"jax {jax.__version__}, target {args.target} (compiled here, no GPU)"
          f"{', XLA options ' + str(args.xla) if args.xla else ''}", flush=True)
    first = None
    for name in args.runs:
        B, variant = runs[name]
        # attention as auto picks it on a GPU (here auto would pick the CPU's kernels)
        cfg = dataclasses.replace(FULL["cfg"], implementation="cudnn", **(variant[1] if variant else {}))
        try:
            # a run's own XLA options (zoo.bench.gpt_step: a variant's third element), then --xla's
            compiled = step_program(cfg, B, args.target, {**(variant[2] if variant and len(variant) > 2 else {}),
                                                          **args.xla})
        except RuntimeError as e:  # no CUDA plugin: what to install
            print(f"gpt_step_hlo.py: {e}", file=sys.stderr)
            return 2
        text = compiled.as_text()
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            with gzip.open(os.path.join(args.out, f"gpt_step-{name}-{args.target}.hlo.txt.gz"), "wt") as f:
                f.write(text)
        ls = hlo.launches(text)
        s = summary(ls)
        temp = compiled.memory_analysis().temp_size_in_bytes / 2 ** 30
        aux = f" (+ {s['aux_gb']:.2f} GB of matmul epilogue outputs)" if s["aux_gb"] else ""
        own = f" (+ {s['kernel_tflop']:.2f} TFLOP in kernels of our own)" if s["kernel_tflop"] else ""
        print(f"{name:48s} {s['launches']:5d} launches, matmuls {s['gemm_tflop']:.2f} TFLOP{own}, fusions and copies "
              f"{s['fusion_gb']:.2f} GB{aux}, "
              f"{s['attention_calls']} attention calls: estimate {s['estimate_ms']:.1f} ms "
              f"of kernels per step; {temp:.1f} GiB of temporaries", flush=True)
        by_source = {r["source"]: r for r in hlo.traffic([x for x in ls if x.kind != "gemm"], by="source")}
        if first is None:
            first = (name, by_source)
            print(f"  where the bytes go (no matmuls; pass and source, largest {args.top}):")
            for r in list(by_source.values())[:args.top]:
                print(f"    {r['gb']:7.2f} GB {r['count']:4d} launches  {r['source']}")
            continue
        diffs = []
        for src in set(by_source) | set(first[1]):
            d = by_source.get(src, {"gb": 0.0, "count": 0})["gb"] - first[1].get(src, {"gb": 0.0})["gb"]
            if abs(d) >= 0.05:
                diffs.append((d, src))
        for d, src in sorted(diffs):
            print(f"    {d:+7.2f} GB vs {first[0]}  {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
