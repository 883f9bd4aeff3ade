"""Metrics: JSONL (one object per logged step) and a tqdm progress bar on a terminal."""

from __future__ import annotations

import json
import math
import os
import sys

from tqdm.auto import tqdm


class MetricsWriter:
    """Appends {"step": N, name: float, ...} lines to `path`; on resume drops lines past `resume_step`.

    Only process 0 writes: every process holds the same (replicated) metrics.
    """

    def __init__(self, path: str | None, resume_step: int = 0, enabled: bool = True):
        self.path = path if enabled else None
        if self.path is None:
            self.f = None
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        kept = []
        if os.path.exists(path):  # a run killed after its last checkpoint logged steps we redo
            with open(path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= resume_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except (ValueError, KeyError):
                        break  # a torn last line
        with open(path, "w") as f:
            f.writelines(kept)
        self.f = open(path, "a")

    def write(self, step: int, metrics: dict) -> None:
        if self.f is None:
            return
        row = {"step": int(step)}
        row.update({k: float(v) for k, v in metrics.items()})
        self.f.write(json.dumps(row, allow_nan=True) + "\n")
        self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def is_finite(x: float) -> bool:
    return math.isfinite(float(x))


def progress(total: int, initial: int, enabled: bool, unit: str = "step"):
    """tqdm bar on an interactive terminal; silent otherwise (CI, logs, tests)."""
    return tqdm(total=total, initial=initial, disable=not (enabled and sys.stderr.isatty()),
                dynamic_ncols=True, unit=unit, file=sys.stderr)
