"""`zoo list | train | sample | eval | bench`.

Bad input (unknown model, config key, value, data source, missing workdir file) exits with status 2
and one `error: ...` line naming the valid choices; a non-finite loss exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import sys
import time

from zoo.errors import ZooError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, status 2, like ours
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _number(kind, text: str, need: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _number(int, text, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = _number(float, text, "a finite number >= 0")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = _number(float, text, "in (0, 1]")
    if not 0 < value <= 1:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="zoo", description="A JAX/Flax model zoo of generative models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="one line per registered model")

    t = sub.add_parser("train", help="train a model (resumes when the workdir holds a checkpoint)")
    t.add_argument("name")
    t.add_argument("--workdir", required=True)
    t.add_argument("--config", help="experiment file (Python) with get_config(); default: the model's")
    t.add_argument("--steps", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--parallel", choices=("jit", "pmap", "fsdp"))
    t.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0")
    t.add_argument("--num-processes", type=int)
    t.add_argument("--process-id", type=int)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optimizer.lr=3e-4")

    s = sub.add_parser("sample", help="sample a trained model: a PNG grid, or text")
    s.add_argument("name")
    s.add_argument("--workdir", required=True)
    s.add_argument("--n", type=_positive_int, default=None, help="how many samples (default: 64 images, 4 texts)")
    s.add_argument("--out", default=None, help="PNG path (default: WORKDIR/samples.png)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--prompt", default=None,
                   help="text models: the text to continue / translate; bert: text with [MASK] bytes to fill")
    s.add_argument("--max-new-tokens", type=_positive_int, default=None)
    s.add_argument("--temperature", type=_nonnegative_float, default=None, help="0 = greedy")
    s.add_argument("--top-k", type=_positive_int, default=None)
    s.add_argument("--top-p", type=_probability, default=None, help="in (0, 1]")
    s.add_argument("--sampler", default=None, help="diffusion: ddpm | ddim | dpm")
    s.add_argument("--steps", type=_positive_int, default=None, help="diffusion: sampler steps")
    s.add_argument("--guidance", type=_nonnegative_float, default=None, help="classifier-free guidance scale")
    s.add_argument("--label", type=int, default=None, help="class to condition on")

    e = sub.add_parser("eval", help="held-out metrics of a trained model as one JSON object")
    e.add_argument("name")
    e.add_argument("--workdir", required=True)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-progress", action="store_true")
    e.add_argument("overrides", nargs="*", help="e.g. model.eval_k=100 eval.max_examples=100")

    b = sub.add_parser("bench", help="run a benchmark; JSON to --out")
    b.add_argument("name")
    b.add_argument("--quick", action="store_true", help="the CPU set that finishes in minutes")
    b.add_argument("--out", default=None)
    return p


def _experiment_config(path: str):
    if not os.path.exists(path):
        raise ZooError(f"missing config file {path}")
    spec = importlib.util.spec_from_file_location("zoo_experiment", path)
    if spec is None or spec.loader is None:
        raise ZooError(f"--config {path} is not a Python file (experiments/*.py define get_config())")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as e:
        raise ZooError(f"--config {path}: line {e.lineno}: {e.msg}") from e
    if not hasattr(mod, "get_config"):
        raise ZooError(f"{path} defines no get_config()")
    return mod.get_config()


def cmd_list(args) -> int:
    from zoo import registry

    for name in registry.names():
        print(f"{name:12s} {registry.get(name).description}")
    return 0


def cmd_train(args) -> int:
    from zoo import registry
    from zoo.train import sharding
    from zoo.train.overrides import apply_overrides

    entry = registry.get(args.name)
    sharding.init_distributed(args.coordinator, args.num_processes, args.process_id)
    config = _experiment_config(args.config) if args.config else entry.config()
    with config.unlocked():
        config.name = args.name
        for flag in ("steps", "seed", "parallel"):
            if getattr(args, flag) is not None:
                config[flag] = getattr(args, flag)
    apply_overrides(config, args.overrides)

    from zoo.train.loop import train
    from zoo.train.workdir import build

    model_def, source = build(config)
    t = time.perf_counter()
    result = train(model_def, config, source, workdir=args.workdir, show_progress=not args.no_progress)
    summary = {"step": result.step, "preempted": result.preempted,
               "train_seconds": round(time.perf_counter() - t, 2),  # init, compile, steps, checkpoints
               # null when too few steps ran to time (JSON has no NaN)
               "steps_per_sec": round(result.steps_per_sec, 2) if math.isfinite(result.steps_per_sec) else None,
               **result.metrics}
    print(json.dumps(summary))
    if result.signal == signal.SIGINT:  # Ctrl-C: saved; the shell's status for an interrupted command
        print(f"interrupted at step {result.step}, checkpoint saved: the same command resumes",
              file=sys.stderr)
        return 130
    return 0


SAMPLE_OPTIONS = ("n", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "sampler", "steps",
                  "guidance", "label")


def cmd_sample(args) -> int:
    import jax
    import numpy as np

    from zoo import xla
    from zoo.images import points_image, save_png
    from zoo.train.workdir import build, load_config, restore_params

    from zoo import registry

    config = load_config(args.workdir, args.name)
    model_def, source = build(config)
    kind = registry.get(args.name).samples or source.info.get("kind")
    if model_def.sample is None and model_def.generate is None:
        raise ZooError(f"model {args.name!r} has no sampler; `zoo eval {args.name} --workdir "
                       f"{args.workdir}` gives its held-out metrics")
    takes = model_def.sample_options if model_def.generate is not None else ("n",)
    if takes is not None:
        flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
        extra = [flag(k) for k in SAMPLE_OPTIONS if getattr(args, k) is not None and k not in takes]
        if extra:
            raise ZooError(f"{args.name} does not use {', '.join(extra)}; its sampling options: "
                           f"{', '.join(flag(k) for k in takes) or 'none'} (plus --seed, and --out for images)")
    params, _ = restore_params(args.workdir, config, model_def, source)
    if model_def.generate is not None:
        request = {k: getattr(args, k) for k in SAMPLE_OPTIONS}
        out = model_def.generate(params, jax.random.PRNGKey(args.seed), request)
        for text in out.get("text", ()):
            print(text)
        for name, images in out.get("images", {}).items():
            path = args.out if (args.out and len(out["images"]) == 1) else os.path.join(args.workdir, f"{name}.png")
            print(save_png(path, np.asarray(images)))
        return 0
    x = np.asarray(xla.jit(model_def.sample, static_argnums=2)(params, jax.random.PRNGKey(args.seed), args.n or 64))
    if kind == "topics":  # top word ids per topic [K, n]; ids themselves when the data has no vocabulary
        vocab = source.info.get("vocab")
        for k, row in enumerate(x):
            print(f"topic {k}: " + " ".join(vocab[int(i)] if vocab else str(int(i)) for i in row))
        return 0
    if kind == "text":
        for row in x:
            print(bytes(int(b) for b in row).decode("utf-8", errors="replace"))
        return 0
    out = args.out or os.path.join(args.workdir, "samples.png")
    if kind == "points":  # [n, 2]: the points themselves as .npy, and their density as the PNG
        np.save(os.path.splitext(out)[0] + ".npy", x)
        x = points_image(x)
    save_png(out, x)
    print(out)
    return 0


def cmd_eval(args) -> int:
    from zoo.eval.run import evaluate_workdir

    print(json.dumps(evaluate_workdir(args.name, args.workdir, seed=args.seed, overrides=args.overrides,
                                     show_progress=not args.no_progress)))
    return 0


def cmd_bench(args) -> int:
    from zoo.bench import run_benchmark

    run_benchmark(args.name, quick=args.quick, out=args.out)
    return 0


def _compilation_cache() -> None:
    """Persist compiled XLA programs across runs (ZOO_COMPILATION_CACHE=DIR; empty turns it off)."""
    path = os.environ.get("ZOO_COMPILATION_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "zoo", "xla"))
    if path:
        import jax

        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv=None) -> int:
    parser = _parser()
    # overrides may come before or after flags: argparse leaves the later ones unparsed
    try:
        args, rest = parser.parse_known_args(argv)
        bad = [r for r in rest if r.startswith("-") or not hasattr(args, "overrides")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return int(e.code or 0)
    if rest:
        args.overrides = list(args.overrides) + rest
    from zoo.train.loop import NonFiniteLoss

    _compilation_cache()

    try:
        return {"list": cmd_list, "train": cmd_train, "sample": cmd_sample, "eval": cmd_eval,
                "bench": cmd_bench}[args.command](args)
    except ZooError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside training's loop (which saves first: cmd_train)
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `zoo sample lda ... | head`: the reader left; not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
