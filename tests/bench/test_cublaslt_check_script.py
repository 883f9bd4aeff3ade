"""benchmarks/scripts/cublaslt_check.py (run on a lent GPU in device.sh part a) on this CPU: with no
GPU it exits 1 saying why (device.sh then turns the call off); with the call stood in (as in
tests/ops/test_cublaslt.py) at small sizes it checks, times each form and exits 0; a stand-in that
computes something else fails the check."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from tests.ops.test_cublaslt import _stand_in
from zoo.ops import cublaslt

ROOT = Path(__file__).resolve().parents[2]


def _script():
    sys.path.insert(0, str(ROOT / "benchmarks" / "scripts"))
    try:
        import cublaslt_check
    finally:
        sys.path.pop(0)
    return cublaslt_check


def test_without_a_gpu_it_says_why_and_fails():
    if jax.default_backend() == "gpu":
        return
    out = subprocess.run([sys.executable, "benchmarks/scripts/cublaslt_check.py"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "cublaslt: unavailable: needs an NVIDIA GPU" in out.stdout or "cublaslt: not built" in out.stdout


def test_checks_and_times_with_the_call_stood_in(monkeypatch, capsys):
    check = _script()
    calls = []
    monkeypatch.setattr(cublaslt, "_call", _stand_in(calls))
    monkeypatch.setattr(cublaslt, "load", lambda: None)
    monkeypatch.setattr(cublaslt, "available", lambda: True)
    monkeypatch.setattr(cublaslt, "build", lambda: Path("stand-in.so"))
    monkeypatch.setitem(cublaslt._state, "version", 130802)
    monkeypatch.setattr(check, "CHECK_ROWS", 64)
    monkeypatch.setattr(check, "TIME_ROWS", 32)
    monkeypatch.setattr(check, "K", 32)
    monkeypatch.setattr(check, "N", 48)
    assert check.main() == 0
    out = capsys.readouterr().out
    assert re.search(r"cublaslt: M64 K32 N48 bf16: dz off float64 by at most one bf16 rounding \+ \S+ \(allowed "
                     r"1e-3\), column sums up to \S+x their rounding noise ok\n", out), out
    assert "cublaslt: M32 K32 N48 bf16 (GPT-124M B64, per layer): xla " in out and ", cublaslt " in out
    assert calls
    # a call that is off by a factor fails the check
    wrong = _stand_in([])
    monkeypatch.setattr(cublaslt, "_call", lambda g, w, z: tuple(x * jnp.asarray(1.1, x.dtype) for x in wrong(g, w, z)))
    assert check.main() == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_the_cudnn_direct_check_without_a_gpu_says_why_and_fails():
    """benchmarks/scripts/cudnn_direct_check.py shares the build-and-load steps (direct_call.py)."""
    if jax.default_backend() == "gpu":
        return
    out = subprocess.run([sys.executable, "benchmarks/scripts/cudnn_direct_check.py"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "ZOO_CUDNN_DIRECT": "0"})
    assert out.returncode == 1, out.stderr[-2000:]
    assert re.search(r"^cudnn-direct: (not built: .+|unavailable: turned off by ZOO_CUDNN_DIRECT=0)$", out.stdout,
                     re.M), out.stdout
