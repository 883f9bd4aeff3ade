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


def test_estimate_charges_a_kernel_with_a_matmul_the_longer_of_its_matmul_and_its_bytes():
    """summary(): a matmul at the matmuls' rate, a fusion's bytes at the fusions', a Pallas kernel
    with a matmul inside (zoo.ops.matmul_gelu's) the longer of the two; its bytes are counted
    among the fusions' but charged once."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "scripts"))
    try:
        import gpt_step_hlo as g
    finally:
        sys.path.pop(0)
    from zoo.bench.hlo import Launch

    gemm = Launch("dot", "gemm", 0, 0, g.GEMM_TFLOPS * 1e12 * 0.002, "backward", "mlp")  # 2 ms
    fusion = Launch("f", "fusion:kLoop", int(g.FUSION_TBPS * 1e9), 0, 0.0, "backward", "mlp")  # 1 ms
    compute_bound = Launch("k", "custom-call:__gpu$xla.gpu.triton", int(g.FUSION_TBPS * 1e9), 0,
                           g.GEMM_TFLOPS * 1e12 * 0.003, "backward", "mlp")  # 3 ms of matmul, 1 of bytes
    memory_bound = Launch("k2", "custom-call:__gpu$xla.gpu.triton", int(g.FUSION_TBPS * 4e9), 0,
                          g.GEMM_TFLOPS * 1e12 * 0.001, "backward", "mlp")  # 1 ms of matmul, 4 of bytes
    s = g.summary([gemm, fusion, compute_bound, memory_bound])
    assert s["estimate_ms"] == pytest.approx(2 + 1 + 3 + 4)
    assert s["fusion_gb"] == pytest.approx(g.FUSION_TBPS * 6) and s["gemm_tflop"] == pytest.approx(g.GEMM_TFLOPS * 0.002)
    assert s["kernel_tflop"] == pytest.approx(g.GEMM_TFLOPS * 0.004)
