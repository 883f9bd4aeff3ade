"""Where a compiled program spends its device time: a table of kernels from jax.profiler's trace.

`kernel_table(fn)` runs `fn` (which must block until its result is ready) a few times under
`jax.profiler.trace(..., create_perfetto_trace=True)`, reads the perfetto trace it writes, and sums
the duration of every complete event ("X") on the device's own timelines: on a GPU the processes
named "/device:GPU:N" (one event per kernel), on a CPU, which has no such process, the XLA
worker threads (everything but the Python thread). Rows are per call of `fn`, largest first, each
with its share of the total and a coarse class (gemm / conv / attention / fusion / copy / other)
so a table says at a glance whether a step is matmul-bound. The benchmarks print it when
ZOO_PROFILE=1 (`zoo bench gpt_step`, `zoo bench diffusion`), for the runs on a lent GPU where there
is no time to profile by hand.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Callable

CLASSES = (  # first match wins; names as cuBLAS / cuDNN / XLA:GPU / XLA:CPU give them
    ("attention", re.compile(r"fmha|flash|cudnn.*attn|sdpa|_attention", re.I)),
    ("conv", re.compile(r"convolution|conv_|_conv\b|^conv|implicit_gemm|fprop|dgrad|wgrad", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|dot|matmul|triton_.*dot", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|transpose", re.I)),
    ("fusion", re.compile(r"fusion|reduce|loop_|input_|triton|elementwise|broadcast", re.I)),
)


def kernel_class(name: str) -> str:
    for cls, pattern in CLASSES:
        if pattern.search(name):
            return cls
    return "other"


def enabled() -> bool:
    return os.environ.get("ZOO_PROFILE", "") not in ("", "0")


def _trace_events(log_dir: str) -> list[dict]:
    paths = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"jax.profiler wrote no perfetto trace under {log_dir}")
    with gzip.open(paths[0]) as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def device_events(events: list[dict]) -> list[dict]:
    """The complete events on device timelines (GPU processes; else the CPU's XLA threads)."""
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    gpu = {pid for pid, name in procs.items() if "/device:" in name}
    if gpu:
        # a GPU process has one timeline per stream plus summary lines ("XLA Ops", "XLA Modules",
        # "Steps"): keep the streams, where the kernels are
        on_gpu = [e for e in complete if e["pid"] in gpu]
        streams = [e for e in on_gpu if "stream" in threads.get((e["pid"], e["tid"]), "stream").lower()]
        return streams or on_gpu
    skip = ("ThreadpoolListener", "ThunkExecutor", "end: ")
    return [e for e in complete if threads.get((e["pid"], e["tid"]), "") != "python"
            and not e["name"].startswith(skip)]


def kernel_bytes(hlo_text: str) -> dict[str, int]:
    """{kernel name as the trace shows it: bytes one launch reads and writes} for the XLA fusions
    and copies of a compiled program (zoo.bench.hlo.launches; a kernel's name is its op's with
    '.' and '-' as '_'). XLA emits one kernel for identical fusions (the same op in each layer)
    under one of their names, so a row's launches all move the bytes of the op it is named for."""
    from zoo.bench import hlo

    ls = [x for x in hlo.launches(hlo_text) if x.kind not in ("gemm", "attention")]
    out = {re.sub(r"[.\-]", "_", x.name): x.bytes for x in ls}
    # a Pallas (Triton) kernel runs under the name its backend config gives it (layer_norm_fwd)
    triton = dict(re.findall(r'%([\w.\-]+) = .*custom_call_target="__gpu\$xla\.gpu\.triton".*?\bname = "([^"]+)"',
                             hlo_text))
    out.update({triton[x.name]: x.bytes for x in ls if x.name in triton})
    return out


def summarize(events: list[dict], calls: int, top: int = 25, kernel_bytes: dict | None = None) -> dict:
    """{"rows": [{"name", "class", "ms", "count", "share"} per call, largest first, with "tbps",
    the bytes moved per second, for the kernels kernel_bytes knows], "classes": {class: share},
    "total_ms": per call}."""
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        total[e["name"]] += e["dur"]
        count[e["name"]] += 1
    grand = sum(total.values()) or 1.0
    by_class = collections.Counter()
    for name, us in total.items():
        by_class[kernel_class(name)] += us
    rows = [{"name": name, "class": kernel_class(name), "ms": us / 1e3 / calls,
             "count": count[name] / calls, "share": us / grand} for name, us in total.most_common(top)]
    for r in rows:
        if kernel_bytes and r["name"] in kernel_bytes:
            r["tbps"] = kernel_bytes[r["name"]] * r["count"] / (r["ms"] * 1e-3) / 1e12
    return {"rows": rows, "classes": {c: us / grand for c, us in by_class.most_common()},
            "total_ms": grand / 1e3 / calls}


def idle_gaps(events: list[dict], calls: int, *, between_calls_us: float = 2000.0, top: int = 8) -> dict:
    """Where the device waits inside a call: the union of the kernels' intervals (all streams),
    and the gaps between them shorter than between_calls_us (longer ones are taken to be the
    host's wait between calls, which a pipelined loop hides). {"idle_ms": per call, "kernels": per
    call, "bins": {"<5us" | "5-20us" | "20-100us" | ">=100us": idle ms per call},
    "largest": [{"us", "after", "before"}, top of them, largest first], "long": the gaps left out
    as between calls, a list of {"us", "after", "before"}: calls - 1 of them unless a call itself
    waits that long somewhere, e.g. on the host, "span_ms": first kernel's start to last kernel's
    end, per call}."""
    spans = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events)
    bins = {"<5us": 0.0, "5-20us": 0.0, "20-100us": 0.0, ">=100us": 0.0}
    largest, long, idle = [], [], 0.0
    end, last = None, ""
    for start, stop, name in spans:
        if end is not None and start > end:
            gap = start - end
            if gap < between_calls_us:
                idle += gap
                key = "<5us" if gap < 5 else "5-20us" if gap < 20 else "20-100us" if gap < 100 else ">=100us"
                bins[key] += gap
                largest.append((gap, last, name))
            else:
                long.append({"us": gap, "after": last, "before": name})
        if end is None or stop > end:
            end, last = stop, name
    largest.sort(key=lambda g: -g[0])
    span = (end - spans[0][0]) if spans else 0.0
    return {"idle_ms": idle / 1e3 / calls, "kernels": len(spans) / calls, "span_ms": span / 1e3 / calls,
            "bins": {k: us / 1e3 / calls for k, us in bins.items()},
            "largest": [{"us": g, "after": a, "before": b} for g, a, b in largest[:top]], "long": long}


_BYTES = re.compile(r"bytes\D{0,3}(\d+)", re.I)


def memsets(events: list[dict], calls: int) -> dict:
    """The memsets among the kernels, by size where the trace gives one (CUPTI's memset record
    reaches the trace as an argument, e.g. "Memset_details": "num_bytes:16777216 ..."):
    {"count": per call, "ms": per call, "sizes": {bytes (None: not in the trace): count per call},
    "args": the first memset's argument names}. Which buffers a library's call zeroes (JAX's cuDNN
    attention runs three memsets before each forward kernel, whose time grows with the sequence,
    where PyTorch's call runs one of ~1 us) shows in their sizes."""
    found = [e for e in events if e["name"].lower().startswith("memset")]
    sizes = collections.Counter()
    for e in found:
        m = next((m for v in e.get("args", {}).values() if (m := _BYTES.search(str(v)))), None)
        sizes[int(m.group(1)) if m else None] += 1
    return {"count": len(found) / calls, "ms": sum(e["dur"] for e in found) / 1e3 / calls,
            "sizes": {b: n / calls for b, n in sorted(sizes.items(), key=lambda kv: -(kv[0] or 0))},
            "args": sorted(found[0].get("args", {})) if found else []}


def kernel_table(fn: Callable[[], object], *, calls: int = 3, top: int = 25, title: str = "",
                 kernel_bytes: dict | None = None) -> dict:
    """Profile `calls` calls of fn (already compiled and warm) and print the kernel table (with
    each fusion's TB/s where kernel_bytes, from the compiled program, knows its bytes)."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                fn()
        events = device_events(_trace_events(d))
        summary = summarize(events, calls, top, kernel_bytes)
        summary["gaps"] = idle_gaps(events, calls)
    print(f"--- kernel time per call{' of ' + title if title else ''}: {summary['total_ms']:.3f} ms "
          f"(first kernel to last: {summary['gaps']['span_ms']:.3f} ms per call); "
          + ", ".join(f"{c} {s:.0%}" for c, s in summary["classes"].items()), flush=True)
    for r in summary["rows"]:
        rate = f"{r['tbps']:5.2f} TB/s" if "tbps" in r else " " * 10
        print(f"  {r['ms']:9.3f} ms {r['share']:6.1%} x{r['count']:<5.0f} {r['class']:9s} {rate} {r['name'][:110]}",
              flush=True)
    g = summary["gaps"]
    print(f"--- idle between kernels per call: {g['idle_ms']:.3f} ms over {g['kernels']:.0f} kernels ("
          + ", ".join(f"{k} {ms:.3f} ms" for k, ms in g["bins"].items()) + "); largest:", flush=True)
    for x in g["largest"]:
        print(f"  {x['us']:9.1f} us after {x['after'][:60]} before {x['before'][:60]}", flush=True)
    print(f"--- gaps of 2 ms or more (between the {calls} calls: {calls - 1} expected): {len(g['long'])}", flush=True)
    for x in g["long"]:
        print(f"  {x['us'] / 1e3:9.2f} ms after {x['after'][:60]} before {x['before'][:60]}", flush=True)
    m = summary["memsets"] = memsets(events, calls)
    if m["count"]:
        sizes = ", ".join(f"{'size not in the trace' if b is None else f'{b:,} B'} x{n:g}"
                          for b, n in m["sizes"].items())
        print(f"--- memsets per call: {m['count']:g} ({m['ms']:.3f} ms): {sizes}"
              + ("" if None not in m["sizes"] else f" (their trace arguments: {', '.join(m['args']) or 'none'})"),
              flush=True)
    return summary


def report(fn: Callable[[], object], *, hlo: Callable[[], str] | None = None, name: str = "program",
           **kwargs) -> dict | None:
    """kernel_table(fn) when ZOO_PROFILE is set, else nothing; a profiler that fails (no CUPTI, a
    trace without device lines) prints why and costs the benchmark none of its rows. With
    ZOO_PROFILE_DIR set too, `hlo()` (the compiled program's text, whose fusion names the table
    shows) is written there as NAME.hlo.txt.gz, and the table gives each fusion's bytes moved per
    second (kernel_bytes)."""
    if not enabled():
        return None
    out = os.environ.get("ZOO_PROFILE_DIR", "")
    try:
        if out and hlo is not None:
            os.makedirs(out, exist_ok=True)
            path = os.path.join(out, re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".hlo.txt.gz")
            text = hlo()
            with gzip.open(path, "wt") as f:
                f.write(text)
            print(f"--- compiled program written to {path}", flush=True)
            try:
                kwargs["kernel_bytes"] = kernel_bytes(text)
            except Exception as e:  # noqa: BLE001 - a program text this parser misreads: no rates
                print(f"--- bytes per kernel skipped: {type(e).__name__}: {e}", flush=True)
        return kernel_table(fn, **kwargs)
    except Exception as e:  # noqa: BLE001 - the table is a diagnostic, the rows are the result
        print(f"--- kernel table skipped: {type(e).__name__}: {e}", flush=True)
        return None
