"""benchmarks/scripts/attention_dispatch.py (run on a lent GPU in device.sh part a) on this CPU, at a
tiny shape: the zoo's attention timed, JAX's cuDNN calls reported unavailable off a GPU (not a
crash), PyTorch's SDPA timed when torch is installed, and the compiled program written."""

import gzip
import re
import subprocess
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[2]


def test_attention_dispatch_script_on_cpu(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/scripts/attention_dispatch.py", "--seqs", "64",
                          "--shape", "1,2,16", "--causal", "--hlo-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    timed = dict(re.findall(r"^S64 causal fwd n=\d+: (\S+) +([\d.]+) ms per call", out.stdout, re.M))
    assert float(timed["zoo-auto"]) > 0
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        assert float(timed["torch-sdpa"]) > 0
    else:
        assert "torch-sdpa" not in timed
    if jax.default_backend() != "gpu":
        for name in ("zoo-cudnn", "jax-cudnn-private"):
            assert re.search(rf"^S64 causal fwd: {name} unavailable \(", out.stdout, re.M)
    program = gzip.open(tmp_path / "attention-S64-causal-fwd.hlo.txt.gz", "rt").read()
    assert "ENTRY" in program and "HloModule" in program


def test_attention_dispatch_script_refuses_a_bad_shape():
    for flag, value in (("--shape", "1,2"), ("--seqs", "64,x"), ("--seqs", "0")):
        out = subprocess.run([sys.executable, "benchmarks/scripts/attention_dispatch.py", flag, value],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "positive integers" in out.stderr and "Traceback" not in out.stderr, out.stderr
