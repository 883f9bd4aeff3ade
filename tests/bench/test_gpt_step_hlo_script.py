"""benchmarks/scripts/gpt_step_hlo.py: GPT-124M's step compiled for an H200 without one. Off a
machine with JAX's CUDA plugin: its arguments and the error that says what to install; with the
plugin (no GPU needed): the matmul FLOPs it reads off the compiled program equal the model's
count, and float32 logits move more bytes than bf16 ones."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.test_hlo import CUDA_PLUGIN
from zoo.bench.gpt_step import FULL, model_flops_per_token

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    return subprocess.run([sys.executable, "benchmarks/scripts/gpt_step_hlo.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_unknown_run_bad_option_and_missing_plugin_are_one_line_errors():
    out = _run("--runs", "bf16-logits,torch-compiled")
    assert out.returncode == 2 and "unknown runs ['64-torch-compiled']" in out.stderr, out.stderr[-800:]
    assert "Traceback" not in out.stderr
    out = _run("--xla", "enable_thing=true")
    assert out.returncode == 2 and "'enable_thing=true': want xla_NAME=VALUE" in out.stderr, out.stderr[-800:]
    if not CUDA_PLUGIN:
        out = _run("--runs", "bf16-logits")
        assert out.returncode == 2 and "pip install jax-cuda13-plugin==" in out.stderr, out.stderr[-800:]
        assert "Traceback" not in out.stderr


@pytest.mark.skipif(not CUDA_PLUGIN, reason="needs JAX's CUDA plugin (jax-cuda13-plugin), not a GPU")
def test_step_program_flops_and_bytes(tmp_path):
    out = _run("--runs", "bf16-logits,64", "--out", str(tmp_path), "--top", "3")
    assert out.returncode == 0, out.stderr[-2000:]
    found = re.findall(r"^(\S+) +\d+ launches, matmuls ([\d.]+) TFLOP, fusions and copies ([\d.]+) GB, "
                       r"(\d+) attention calls", out.stdout, re.M)
    rows = {n: (float(t), float(g)) for n, t, g, _ in found}
    assert all(int(a) == 24 for *_, a in found)  # a forward and a backward cuDNN call per layer
    assert set(rows) == {"64-bf16-logits", "64"}, out.stdout
    cfg, B = FULL["cfg"], 64
    T = cfg.max_len
    # the model's matmuls: 6 N per token, N the layers' weights and the tied output layer (the
    # attention's 12 L H T is cuDNN's, not a matmul's)
    want = (model_flops_per_token(cfg, T) - 12 * cfg.num_layers * cfg.hidden * T) * B * T / 1e12
    for tflop, _ in rows.values():
        assert tflop == pytest.approx(want, rel=0.01)
    # float32 logits: the loss reads and the backward writes [B * T, V] in float32, not bf16
    logits = B * T * cfg.vocab_size * 2 / 1e9
    assert rows["64"][1] - rows["64-bf16-logits"][1] > 2 * logits
    # the device memory the step needs beside its state: float32 logits need more
    temps = dict(re.findall(r"^(\S+) .* ([\d.]+) GiB of temporaries$", out.stdout, re.M))
    assert float(temps["64"]) > float(temps["64-bf16-logits"]) > 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt_step-64-bf16-logits-h200.hlo.txt.gz",
                                                         "gpt_step-64-h200.hlo.txt.gz"]
