"""benchmarks/scripts/cublaslt_check.py (run on a lent GPU in device.sh part a) on this CPU: with no
GPU it exits 1 saying why (device.sh then turns the calls off); with the calls stood in (as in
tests/ops/test_cublaslt.py) at small sizes it checks, times each form and exits 0; a DGELU
stand-in that computes something else fails the check (1), a weight-gradient one fails its part
(3)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from tests.ops.test_cublaslt import _stand_in, _wgrad_stand_in
from zoo.ops import cublaslt
from zoo.ops.matmul_gelu import gelu_tanh_grad

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


def test_checks_and_times_with_the_call_stood_in(monkeypatch, capsys, tmp_path):
    check = _script()
    monkeypatch.setenv("ZOO_CUBLASLT_WGRAD_EPILOGUE", "bgradb")  # the script sets these: restored after
    monkeypatch.setenv("ZOO_CUBLASLT_DGELU_W", "nk")
    monkeypatch.delenv("ZOO_CHECK_ENV_FILE", raising=False)
    calls = []
    monkeypatch.setattr(cublaslt, "_call", _stand_in(calls))
    monkeypatch.setattr(cublaslt, "_wgrad_call", _wgrad_stand_in(calls))
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
    for layout in ("nk", "kn"):
        assert re.search(rf"cublaslt: dgelu w {layout} M64 K32 N48 bf16: dz off float64 by at most two bf16 roundings "
                         r"\+ \S+ \(allowed 1e-3; XLA's form \S+\), column sums up to \S+x their rounding noise ok\n"
                         r"cublaslt:   its worst element \(\d+, \d+\): g w\^T \S+, z \S+, GELU'\(z\) \S+, float64 dz \S+, "
                         r"cuBLASLt \S+, XLA's form \S+; beyond one rounding: \S+ \(XLA's form \S+\)\n", out), out
    assert re.search(r"cublaslt: dgelu M32 K32 N48 bf16 \(GPT-124M B64, per layer\): xla \S+ ms \(\d+ TFLOP/s\), "
                     r"cublaslt w nk \S+ ms \(\d+ TFLOP/s\), cublaslt w kn \S+ ms \(\d+ TFLOP/s\)", out), out
    for epilogue in ("bgradb", "bgrada"):
        assert re.search(rf"cublaslt: wgrad {epilogue} M64 I32 F32 bf16: dw and db off float64 by at most one bf16 "
                         r"rounding \+ \S+ \(allowed 1e-3\) ok\n", out), out
    assert re.search(r"cublaslt: wgrad M32 I32 F32 bf16 \(GPT-124M B64, per projection\): xla \S+ ms \(\d+ TFLOP/s\), "
                     r"cublaslt bgradb \S+ ms \(\d+ TFLOP/s\), cublaslt bgrada ", out), out
    assert ("wgrad", (64, 32), (64, 32)) in calls and (64, 32) in calls
    assert "for the rest of the lease" not in out  # no env file: nothing chosen
    # a weight-gradient call off by a factor fails its own part: exit 3
    wrong_w = _wgrad_stand_in([])
    monkeypatch.setattr(cublaslt, "_wgrad_call", lambda x, dy, e: tuple(a * jnp.asarray(1.1, a.dtype)
                                                                         for a in wrong_w(x, dy, e)))
    assert check.main() == 3
    assert "wgrad bgradb M64 I32 F32 bf16: dw and db off float64 by at most one bf16 rounding" in capsys.readouterr().out
    # one that fails outright with the default epilogue: exit 3, the error printed, the other timed
    monkeypatch.setattr(cublaslt, "_wgrad_call", lambda x, dy, e: 1 / 0 if e == "bgradb" else _wgrad_stand_in([])(x, dy, e))
    assert check.main() == 3
    out = capsys.readouterr().out
    assert "cublaslt: wgrad bgradb failed: ZeroDivisionError: division by zero" in out
    assert "cublaslt: wgrad bgrada M64" in out and ", cublaslt bgrada " in out
    assert os.environ["ZOO_CUBLASLT_WGRAD_EPILOGUE"] == "bgradb" and os.environ["ZOO_CUBLASLT_DGELU_W"] == "nk"
    # with an env file (device.sh's check): for each call the faster form that checks out
    env_file = tmp_path / "cublaslt.env"
    monkeypatch.setenv("ZOO_CHECK_ENV_FILE", str(env_file))
    assert check.main() == 0  # bgradb still fails: bgrada, the one left
    lines = env_file.read_text().splitlines()
    assert lines[0] in ("export ZOO_CUBLASLT_DGELU_W=nk", "export ZOO_CUBLASLT_DGELU_W=kn")
    assert lines[1:] == ["export ZOO_CUBLASLT_WGRAD_EPILOGUE=bgrada"]
    assert "cublaslt: wgrad by bgrada for the rest of the lease" in capsys.readouterr().out
    monkeypatch.setattr(cublaslt, "_wgrad_call", _wgrad_stand_in([]))
    monkeypatch.delenv("ZOO_CHECK_ENV_FILE")
    # a DGELU call that rounds the product to bf16 before the GELU' multiply, as XLA's form does:
    # within two roundings; one 1% off in both layouts fails: exit 1
    def rounded(g, w, z, lay):
        w = w.T if lay == "kn" else w
        dz = jnp.dot(g, w.T).astype(jnp.bfloat16).astype(jnp.float32) * gelu_tanh_grad(z)
        return dz.astype(z.dtype), jnp.sum(dz, axis=0).astype(z.dtype)
    monkeypatch.setattr(cublaslt, "_call", rounded)
    assert check.main() == 0
    wrong = _stand_in([])
    for factor in (1.01, 1.1):
        monkeypatch.setattr(cublaslt, "_call", lambda g, w, z, lay: tuple(
            (x.astype(jnp.float32) * factor).astype(x.dtype) for x in wrong(g, w, z, lay)))
        assert check.main() == 1
        assert "MISMATCH" in capsys.readouterr().out
    # wrong in its default layout only: without an env file that fails too, with one "kn" is chosen
    monkeypatch.setattr(cublaslt, "_call", lambda g, w, z, lay: (wrong if lay == "kn" else
                                                                 lambda *a: 1 / 0)(g, w, z, lay))
    assert check.main() == 1
    env_file.unlink()
    monkeypatch.setenv("ZOO_CHECK_ENV_FILE", str(env_file))
    assert check.main() == 0
    assert env_file.read_text().splitlines()[0] == "export ZOO_CUBLASLT_DGELU_W=kn"


def test_the_cudnn_direct_check_without_a_gpu_says_why_and_fails():
    """benchmarks/scripts/cudnn_direct_check.py shares the build-and-load steps (direct_call.py)."""
    if jax.default_backend() == "gpu":
        return
    out = subprocess.run([sys.executable, "benchmarks/scripts/cudnn_direct_check.py"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "ZOO_CUDNN_DIRECT": "0"})
    assert out.returncode == 1, out.stderr[-2000:]
    assert re.search(r"^cudnn-direct: (not built: .+|unavailable: turned off by ZOO_CUDNN_DIRECT=0)$", out.stdout,
                     re.M), out.stdout
