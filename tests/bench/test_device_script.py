"""benchmarks/device.sh's control flow, with a stand-in python3 on PATH that records each call
(its arguments and the environment the script gives it) and fails where told: the parts run their
steps in order, attention in two processes, a faulting part re-run without command buffers, the
gpt_step variants with their run lists and XLA flags, each writing to its own files."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE = """#!/bin/bash
echo "$* |MASKS=${ZOO_ATTENTION_MASKS:-}|LENGTHS=${ZOO_ATTENTION_LENGTHS:-}|RUNS=${ZOO_GPT_STEP_RUNS:-}|XLA=${XLA_FLAGS:-}|DIR=${ZOO_PROFILE_DIR:-}|SKIP=${ZOO_ATTENTION_SKIP:-}" >> "$CALLS"
if [[ "$*" == *"bench attention"* && -n "${FAKE_SLEEP:-}" ]]; then sleep "$FAKE_SLEEP"; fi
prev=""; for a in "$@"; do if [[ "$prev" == --out ]]; then echo '{"rows": []}' > "$a"; fi; prev=$a; done
if [[ "$*" == *"bench attention"* && "${ZOO_ATTENTION_MASKS:-}" == causal && -z "${XLA_FLAGS:-}" ]]; then exit 3; fi
exit 0
"""


def _run(tmp_path, part):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(FAKE)
    (bin_dir / "python3").chmod(0o755)
    calls = tmp_path / f"calls-{part}.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls)}
    env.pop("ZOO_ATTENTION_SKIP", None)
    out = subprocess.run(["bash", "benchmarks/device.sh", part, str(tmp_path / "out"), "abc123"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line for line in calls.read_text().splitlines() if line.startswith("-m zoo bench ")]


def _outputs(calls, out):
    """The result file each benchmark call was told to write, relative to out."""
    return [c.split(" |")[0].split(" --out ")[1].removeprefix(f"{out}/") for c in calls]


def test_part_a_runs_attention_in_two_processes_and_reruns_the_faulting_one(tmp_path):
    calls = _run(tmp_path, "a")
    out = tmp_path / "out"
    assert all(c.startswith("-m zoo bench attention ") for c in calls)
    assert _outputs(calls, out) == ["attention-full-gpu.json", "attention-causal-gpu.json",
                                    "attention-causal-nocmdbuf-gpu.json", "attention-s1024-cmdbuf-gpu.json"]
    assert "|MASKS=full|LENGTHS=|" in calls[0] and "|MASKS=causal|" in calls[1] and "|XLA=|" in calls[1]
    assert "|XLA=--xla_gpu_enable_command_buffer=|" in calls[2] and f"|DIR={out}/causal-nocmdbuf|" in calls[2]
    # the S1024 cases, full and causal in one process, with the cuDNN calls in command buffers
    assert "|MASKS=|LENGTHS=1024|" in calls[3] and f"|DIR={out}/s1024-cmdbuf|" in calls[3]
    assert "|XLA=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN " in calls[3]
    assert all("SKIP=zoo-cudnn,zoo-reference,zoo-xla,zoo-chunked" in c for c in calls)
    log = (out / "log-a.txt").read_text()
    assert "attention-causal exit 3" in log
    assert log.index("=== attention dispatch, S1024") < log.index("=== zoo bench attention-full")
    dispatch = [line for line in (tmp_path / "calls-a.txt").read_text().splitlines()
                if line.startswith("benchmarks/scripts/attention_dispatch.py")]
    assert len(dispatch) == 1 and f"--seqs 1024 --hlo-dir {out} |" in dispatch[0]


def test_part_b_and_the_gpt_step_variants(tmp_path):
    calls = _run(tmp_path, "b")
    out = tmp_path / "out"
    log = (out / "log-b.txt").read_text()
    assert "=== Pallas kernels" in log and log.index("=== Pallas kernels") < log.index("=== zoo bench gpt_step")
    pallas = [line for line in (tmp_path / "calls-b.txt").read_text().splitlines()
              if line.startswith("benchmarks/scripts/pallas_kernels.py")]
    assert len(pallas) == 1
    assert [c.split(" --out ")[0] for c in calls] == ["-m zoo bench gpt_step"]
    assert _outputs(calls, out) == ["gpt_step-gpu.json"]
    assert "|RUNS=|XLA=|" in calls[0] and f"|DIR={out}|" in calls[0]
    calls = _run(tmp_path, "gpt_step-cublaslt,gpt_step-nocmdbuf")
    assert _outputs(calls, out) == ["gpt_step-cublaslt-gpu.json", "gpt_step-nocmdbuf-gpu.json"]
    assert "|RUNS=64-bf16-logits|XLA=--xla_gpu_enable_cublaslt=true|" in calls[0]
    assert "|RUNS=64-bf16-logits|XLA=--xla_gpu_enable_command_buffer=|" in calls[1]


def test_unknown_part_is_refused(tmp_path):
    out = subprocess.run(["bash", "benchmarks/device.sh", "gpt", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown PART or step 'gpt'" in out.stderr


def _lease(tmp_path, *args, sleep=""):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(FAKE)
    (bin_dir / "python3").chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "FAKE_SLEEP": sleep}
    return subprocess.run(["bash", "benchmarks/lease.sh", str(tmp_path / "out"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120), calls


def test_lease_runs_part_a_then_b_and_returns_few_files(tmp_path):
    """benchmarks/lease.sh: part a then part b in one command, and at most 8 files back (the
    device tool's limit): both logs as text, everything else in one tarball."""
    import tarfile

    if shutil.which("bash") is None or shutil.which("tar") is None:
        pytest.skip("no bash or tar")
    out, calls = _lease(tmp_path, "abc123")
    assert out.returncode == 0, out.stderr
    benches = [line.split(" --out ")[0] for line in calls.read_text().splitlines() if line.startswith("-m zoo bench ")]
    assert benches[:2] == ["-m zoo bench attention"] * 2 and benches[-1] == "-m zoo bench gpt_step"
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["lease.tar.gz", "log-a.txt", "log-b.txt"]
    with tarfile.open(tmp_path / "out" / "lease.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"log-a.txt", "log-b.txt", "attention-full-gpu.json", "gpt_step-gpu.json"} <= names


def test_lease_cuts_a_part_at_the_budget_and_skips_what_has_no_time(tmp_path):
    if shutil.which("bash") is None or shutil.which("tar") is None:
        pytest.skip("no bash or tar")
    out, calls = _lease(tmp_path, "abc123", "6", sleep="30")  # attention hangs past the budget
    assert out.returncode == 0, out.stderr
    log_a, log_b = ((tmp_path / "out" / f"log-{p}.txt").read_text() for p in "ab")
    # attention (full) cut at the deadline, the causal half and part b skipped: nothing runs on
    assert "attention-full exit 124" in log_a and "=== skipped, past the deadline" in log_a
    assert "attention-causal exit 124" in log_a
    assert "part b skipped" in log_b and "bench gpt_step" not in calls.read_text()
    if shutil.which("pgrep"):
        assert subprocess.run(["pgrep", "-f", "sleep 30"], capture_output=True).returncode == 1  # none left running
    bad = subprocess.run(["bash", "benchmarks/lease.sh", str(tmp_path / "o2"), "sha", "ten"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "BUDGET_S must be a whole number" in bad.stderr
