"""Benchmark harness: `zoo bench NAME [--quick] [--out FILE.json]`.

A benchmark module defines `run(quick: bool) -> list[row]`, row = {"case", "impl", "value", "unit"}
(extra keys allowed). `impl` starts with "zoo" for ours and names the peer otherwise. The harness
adds the device, JAX version, git SHA and date, prints a table with each row's ratio to the
case's first row, and writes the JSON the results folder keeps.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import random
import statistics
import subprocess
import time
from typing import Callable

from zoo.errors import ZooError, unknown

BENCHMARKS = {
    "train_step": "zoo.bench.train_step",
    "gibbs": "zoo.bench.gibbs",
    "attention": "zoo.bench.attention",
    "gpt_step": "zoo.bench.gpt_step",
    "diffusion": "zoo.bench.diffusion",
}


def median_seconds(fn: Callable[[], object], *, warmup: int = 2, iters: int = 10) -> float:
    """Median wall time of fn(); fn must block until its result is ready (block_until_ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_times(fns: dict, rounds: int, *, pause_s: float = 0.0,
                      warm_below_s: float = 0.0, order: str = "rotate") -> dict:
    """{impl: [seconds of one call per round]}: every implementation once per round, in turn, so a
    drift in machine load hits all alike, and round r starts at the r-th implementation (the order
    rotates) so none always runs first or after the same neighbour: on an H200 the first of each
    round, which followed the heaviest call, ran 5-15% slower than the same compiled program
    later in the round. Each call follows a pause of pause_s (threads still spinning from the
    previous implementation go idle); from the second round on, an implementation whose fastest
    call so far is under warm_below_s is timed right after an untimed call, so a short call does
    not pay for waking the idle thread pools after the pause.

    order="shuffle": round r runs the implementations in a random order (seeded by r, so runs
    repeat) instead of rotating. Rotation keeps each implementation's predecessor (b always
    follows a), and on a GPU whose clock drops under sustained power (the H200 of 2026-11-27:
    1500-1980 MHz during the attention benchmark) what ran just before moves a kernel's time: the
    same cuDNN kernel (PyTorch's, by two rows) timed up to 13% faster after PyTorch's flash row
    than after the zoo's. Shuffled, each implementation follows a different neighbour from round to round."""
    if order not in ("rotate", "shuffle"):
        raise ValueError(f"order must be 'rotate' or 'shuffle'; got {order!r}")
    times = {impl: [] for impl in fns}
    names = list(fns)
    for r in range(rounds):
        if order == "shuffle":
            sequence = random.Random(r).sample(names, len(names))
        else:
            sequence = names[r % len(names):] + names[:r % len(names)]
        for impl in sequence:
            fn = fns[impl]
            if pause_s:
                time.sleep(pause_s)
            warm = r > 0 and min(times[impl]) < warm_below_s
            times[impl].append(median_seconds(fn, warmup=int(warm), iters=1))
    return times


def paired_speedup(times: list[float], peer_times: list[float]) -> float:
    """How many times faster than a peer, round by round: the median over rounds of the peer's
    time over this one's, both from interleaved_times (each round times both within a second or
    so, so a drift in machine load between rounds cancels where a ratio of medians keeps it)."""
    return statistics.median(p / t for t, p in zip(times, peer_times))


def git_sha() -> str:
    """The checkout's short SHA; ZOO_GIT_SHA wins (a copied tree without .git, as on a lent GPU)."""
    if os.environ.get("ZOO_GIT_SHA"):
        return os.environ["ZOO_GIT_SHA"]
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def switches() -> dict:
    """The environment that changes what a benchmark runs: every ZOO_* variable set (the direct
    calls' switches and forms, ZOO_CUBLASLT_WGRAD_EPILOGUE and the like; a lease's check may set
    them) and XLA_FLAGS, so that a result says which program it timed."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("ZOO_") or k == "XLA_FLAGS"}


def header(name: str) -> dict:
    import jax

    dev = jax.devices()[0]
    return {"benchmark": name, "device": f"{dev.platform}:{dev.device_kind}", "device_count": jax.device_count(),
            "jax": jax.__version__, "sha": git_sha(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "env": switches()}


def table(rows: list[dict]) -> str:
    firsts: dict[str, float] = {}
    lines = [f"{'case':40s} {'impl':24s} {'value':>12s} {'unit':10s} {'ratio':>7s}"]
    for r in rows:
        base = firsts.setdefault(r["case"], r["value"])
        ratio = r["value"] / base if base else float("nan")
        lines.append(f"{r['case']:40s} {r['impl']:24s} {r['value']:12.4g} {r['unit']:10s} {ratio:7.3f}")
    return "\n".join(lines)


_partial: str | None = None  # run_benchmark's OUT.partial.jsonl while it runs, else None


def emit(rows: list[dict]) -> list[dict]:
    """Print rows as soon as a case is measured (flushed), so a run cut off by a time limit still
    leaves every finished case in its log, and, under run_benchmark with an output file, append
    them to OUT.partial.jsonl (its first line the header): a cut run's finished rows as data;
    returns rows."""
    for r in rows:
        print(f"  {r['case']:40s} {r['impl']:24s} {r['value']:12.4g} {r['unit']}", flush=True)
    if _partial:
        with open(_partial, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def run_benchmark(name: str, *, quick: bool = False, out: str | None = None) -> dict:
    if name not in BENCHMARKS:
        raise ZooError(unknown("benchmark", name, BENCHMARKS))
    global _partial
    module = importlib.import_module(BENCHMARKS[name])
    head = {**header(name), "quick": quick}
    if out:  # before the run: a path that cannot be written fails now, not after it
        try:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            _partial = out + ".partial.jsonl"
            with open(_partial, "w") as f:
                f.write(json.dumps(head) + "\n")
        except OSError as e:
            raise ZooError(f"cannot write --out {out}: {e.strerror or e}") from e
    try:
        result = {**head, "rows": module.run(quick)}
    finally:
        partial, _partial = _partial, None
    print(table(result["rows"]))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.remove(partial)  # the whole result is in out
        print(f"wrote {out}")
    return result
