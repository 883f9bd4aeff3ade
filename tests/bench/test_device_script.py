"""benchmarks/device.sh's control flow, with a stand-in python3 on PATH that records each call
(its arguments and the environment the script gives it) and fails where told: the parts run their
steps in order, attention in two processes, a faulting part re-run without command buffers, the
gpt_step variants with their run lists and XLA flags, each writing to its own files."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE = """#!/bin/bash
echo "$* |MASKS=${ZOO_ATTENTION_MASKS:-}|LENGTHS=${ZOO_ATTENTION_LENGTHS:-}|RUNS=${ZOO_GPT_STEP_RUNS:-}|XLA=${XLA_FLAGS:-}|DIR=${ZOO_PROFILE_DIR:-}|SKIP=${ZOO_ATTENTION_SKIP:-}|EPI=${ZOO_CUBLASLT_WGRAD_EPILOGUE:-}|LTW=${ZOO_CUBLASLT_WGRAD:-}|CUDNN=${ZOO_CUDNN_DIRECT:-}|LT=${ZOO_CUBLASLT:-}" >> "$CALLS"
if [[ "$*" == *cudnn_direct_check.py* && -n "${FAKE_CUDNN_FAIL:-}" ]]; then exit 1; fi
if [[ "$*" == *"cudnn_direct.build()"* && -n "${FAKE_BUILD_S:-}" ]]; then sleep "$FAKE_BUILD_S"; echo "build done" >> "$CALLS"; fi
if [[ "$*" == *cublaslt_check.py* && -n "${FAKE_CUBLASLT_FAIL:-}" ]]; then exit 139; fi
if [[ "$*" == *cublaslt_check.py* && -n "${FAKE_CUBLASLT_WGRAD_FAIL:-}" ]]; then exit 3; fi
if [[ "$*" == *cublaslt_check.py* && -n "${ZOO_CHECK_ENV_FILE:-}" ]]; then echo "export ZOO_CUBLASLT_WGRAD_EPILOGUE=bgrada" >> "$ZOO_CHECK_ENV_FILE"; fi
if [[ "$*" == *cudnn_direct_check.py* && -n "${ZOO_CHECK_ENV_FILE:-}" ]]; then echo "export ZOO_CUDNN_DIRECT=1" >> "$ZOO_CHECK_ENV_FILE"; fi
if [[ "$*" == *"bench attention"* && -n "${FAKE_SLEEP:-}" ]]; then sleep "$FAKE_SLEEP"; fi
prev=""; for a in "$@"; do if [[ "$prev" == --out ]]; then echo '{"rows": []}' > "$a"; fi; prev=$a; done
if [[ "$*" == *"bench attention"* && "${ZOO_ATTENTION_MASKS:-}" == causal && -z "${XLA_FLAGS:-}" ]]; then exit 3; fi
exit 0
"""


def _run(tmp_path, part, cuda_gdb=False, **env_extra):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(FAKE)
    (bin_dir / "python3").chmod(0o755)
    if cuda_gdb:  # records how it was called, and prints a backtrace's first line
        (bin_dir / "cuda-gdb").write_text('#!/bin/bash\necho "cuda-gdb $*" >> "$CALLS"\necho "#0  0x1 in crash ()"\n')
        (bin_dir / "cuda-gdb").chmod(0o755)
    calls = tmp_path / f"calls-{part}.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), **env_extra}
    env.pop("ZOO_ATTENTION_SKIP", None)
    env.pop("ZOO_CUDNN_DIRECT", None)
    env.pop("ZOO_CUBLASLT", None)
    env.pop("ZOO_CUBLASLT_WGRAD", None)
    env.pop("ZOO_CUBLASLT_WGRAD_EPILOGUE", None)
    out = subprocess.run(["bash", "benchmarks/device.sh", part, str(tmp_path / "out"), "abc123"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line for line in calls.read_text().splitlines() if line.startswith("-m zoo bench ")]


def _outputs(calls, out):
    """The result file each benchmark call was told to write, relative to out."""
    return [c.split(" |")[0].split(" --out ")[1].removeprefix(f"{out}/") for c in calls]


def test_part_a_runs_the_tests_and_the_dispatch(tmp_path):
    assert _run(tmp_path, "a", FAKE_BUILD_S="2") == []  # no benchmark
    out = tmp_path / "out"
    log = (out / "log-a.txt").read_text()
    assert (log.index("=== cublaslt check") < log.index("=== cudnn-direct check") < log.index("=== GPU tests")
            < log.index("=== attention dispatch, S1024"))
    lines = (tmp_path / "calls-a.txt").read_text().splitlines()
    # cuDNN's library built in the background (2 s here): the cuBLASLt check runs meanwhile, and
    # cuDNN's check waits for it
    first = lambda prefix: min(i for i, line in enumerate(lines) if line.startswith(prefix))  # noqa: E731
    assert sum(line.startswith("-c from zoo.ops import cudnn_direct;") for line in lines) == 1
    assert (first("benchmarks/scripts/cublaslt_check.py") < first("build done")
            < first("benchmarks/scripts/cudnn_direct_check.py"))
    assert (out / "cudnn-build.txt").exists()
    assert sum(line.startswith("benchmarks/scripts/cudnn_direct_check.py") for line in lines) == 1
    assert sum(line.startswith("benchmarks/scripts/cublaslt_check.py") for line in lines) == 1
    tests = [line for line in lines if line.startswith("-m pytest -q -m gpu")]
    assert len(tests) == 1 and "tests/ops/test_cudnn_direct.py tests/ops/test_cublaslt.py |" in tests[0]
    assert tests[0].endswith("|CUDNN=1|LT=") and not (out / "cudnn-direct-off").exists()  # its check passed
    assert not (out / "cublaslt-off").exists()
    dispatch = [line for line in lines if line.startswith("benchmarks/scripts/attention_dispatch.py")]
    assert len(dispatch) == 1 and f"--seqs 1024 --hlo-dir {out} |" in dispatch[0]
    assert any(line.startswith("benchmarks/scripts/cudnn_libs.py") for line in lines)


def test_part_d_runs_attention_in_two_processes_and_reruns_the_faulting_one(tmp_path):
    calls = _run(tmp_path, "d")
    out = tmp_path / "out"
    assert all(c.startswith("-m zoo bench attention ") for c in calls)
    assert _outputs(calls, out) == ["attention-full-gpu.json", "attention-causal-gpu.json",
                                    "attention-causal-nocmdbuf-gpu.json", "attention-fault-zoo-gpu.json",
                                    "attention-fault-torch-gpu.json"]
    assert "|MASKS=full|LENGTHS=|" in calls[0] and "|MASKS=causal|" in calls[1] and "|XLA=|" in calls[1]
    assert "|XLA=--xla_gpu_enable_command_buffer=|" in calls[2] and f"|DIR={out}/causal-nocmdbuf|" in calls[2]
    assert all("SKIP=zoo-cudnn,zoo-reference,zoo-xla,zoo-chunked" in c for c in calls)
    assert "attention-causal exit 3" in (out / "log-d.txt").read_text()
    # a part faulted: the S1024 full case with command buffers (XLA's flags left alone), the zoo's
    # rows alone, then PyTorch's alone
    for call, skipped in ((calls[3], ",torch-sdpa,torch-sdpa-flash,torch-sdpa-cudnn,torch-sdpa-efficient,"
                                      "torch-sdpa-math|"), (calls[4], ",zoo-auto,matmul-ceiling|")):
        assert "|MASKS=full|LENGTHS=1024|RUNS=|XLA=|" in call and skipped in call, call
    # the S1024 cases, full and causal in one process, with the cuDNN calls in command buffers:
    # a step of its own (part d until 2026-11-27)
    (calls,) = _run(tmp_path, "attention-s1024-cmdbuf")
    assert _outputs([calls], out) == ["attention-s1024-cmdbuf-gpu.json"]
    assert "|MASKS=|LENGTHS=1024|" in calls and f"|DIR={out}/s1024-cmdbuf|" in calls
    assert "|XLA=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN " in calls
    # cuDNN's libraries are listed once per lease, in part a
    assert not any(line.startswith("benchmarks/scripts/cudnn_libs.py")
                   for line in (tmp_path / "calls-d.txt").read_text().splitlines())


def test_part_b_and_the_gpt_step_variants(tmp_path):
    calls = _run(tmp_path, "b")
    out = tmp_path / "out"
    log = (out / "log-b.txt").read_text()
    # the step first (its runs matter most), then the kernels alone
    assert "=== Pallas kernels" in log and log.index("=== zoo bench gpt_step") < log.index("=== Pallas kernels")
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


def test_lease_runs_parts_a_b_d_and_returns_few_files(tmp_path):
    """benchmarks/lease.sh: parts a, b, then d in one command, and at most 8 files back (the
    device tool's limit): the logs as text, everything else in one tarball."""
    import tarfile

    if shutil.which("bash") is None or shutil.which("tar") is None:
        pytest.skip("no bash or tar")
    out, calls = _lease(tmp_path, "abc123")
    assert out.returncode == 0, out.stderr
    benches = [line.split(" --out ")[0] for line in calls.read_text().splitlines() if line.startswith("-m zoo bench ")]
    assert benches[0] == "-m zoo bench gpt_step" and benches[1:] == ["-m zoo bench attention"] * 5  # 2: the fault's
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["lease.tar.gz", "log-a.txt", "log-b.txt", "log-d.txt"]
    with tarfile.open(tmp_path / "out" / "lease.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"log-a.txt", "log-b.txt", "log-d.txt", "attention-full-gpu.json", "gpt_step-gpu.json"} <= names


def test_lease_cuts_a_part_at_the_budget_and_skips_what_has_no_time(tmp_path):
    if shutil.which("bash") is None or shutil.which("tar") is None:
        pytest.skip("no bash or tar")
    # attention hangs past the budget; a sleep length of this run's own (pgrep below sees the whole
    # machine: another run of this test, a CI clone's beside a working tree's, has its own sleeps)
    sleep = f"29.{os.getpid():07d}"
    out, calls = _lease(tmp_path, "abc123", "9", sleep=sleep)
    assert out.returncode == 0, out.stderr
    log_b, log_d = ((tmp_path / "out" / f"log-{p}.txt").read_text() for p in "bd")
    assert "bench gpt_step" in calls.read_text() and "gpt_step exit 0" in log_b
    # the full set cut at the deadline, the rest of part d skipped: nothing runs on
    assert "attention-full exit 124" in log_d and "=== skipped, past the deadline" in log_d
    if shutil.which("pgrep"):
        # none left running (the whole command line: no other process's "sleep 300; ..." matches)
        assert subprocess.run(["pgrep", "-f", rf"^sleep {re.escape(sleep)}$"], capture_output=True).returncode == 1
    for args, env, message in ((["sha", "ten"], {}, "BUDGET_S must be a whole number"),
                               (["sha"], {"RESERVE_S": "lots"}, "RESERVE_S must be a whole number")):
        bad = subprocess.run(["bash", "benchmarks/lease.sh", str(tmp_path / "o2"), *args], cwd=ROOT,
                             env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and message in bad.stderr


def test_lease_leaves_part_d_its_reserve(tmp_path):
    """Part b runs to a deadline RESERVE_S before the budget's end (at most a third of it): a
    gpt_step that would run on is cut there and part d still starts."""
    if shutil.which("bash") is None or shutil.which("tar") is None:
        pytest.skip("no bash or tar")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE.replace('"bench attention"* && -n', '"bench gpt_step"* && -n'))
    (bin_dir / "python3").chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "FAKE_SLEEP": "60",
           "RESERVE_S": "6"}
    out = subprocess.run(["bash", "benchmarks/lease.sh", str(tmp_path / "out"), "abc123", "18"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "gpt_step exit 124" in (tmp_path / "out" / "log-b.txt").read_text()
    assert "bench attention" in calls.read_text()  # part d ran in its reserve


def test_a_failed_cudnn_direct_check_turns_it_off_for_the_rest_of_the_lease(tmp_path):
    """The check fails (or crashes) in part a: the GPU tests and the dispatch after it, and the
    benchmarks of a later part in the same OUTDIR, run with ZOO_CUDNN_DIRECT=0."""
    assert _run(tmp_path, "a", FAKE_CUDNN_FAIL="1") == []
    out = tmp_path / "out"
    assert (out / "cudnn-direct-off").exists() and "=== cudnn-direct off" in (out / "log-a.txt").read_text()
    later = [line for line in (tmp_path / "calls-a.txt").read_text().splitlines()
             if line.startswith(("-m pytest", "benchmarks/scripts/attention_dispatch.py"))]
    assert len(later) == 2 and all(line.endswith("|CUDNN=0|LT=") for line in later)
    calls = _run(tmp_path, "b")
    assert calls and all(c.endswith("|CUDNN=0|LT=") for c in calls)


def test_a_crashed_cublaslt_check_turns_it_off_for_the_rest_of_the_lease(tmp_path):
    """The cuBLASLt check crashes in part a (a segfault's status): it runs again under cuda-gdb
    for the backtrace; what runs after it, and a later part's gpt_step, run with ZOO_CUBLASLT=0
    (its runs lose their own rows); cuDNN's call stays on, and auto takes it (its check passed)."""
    assert _run(tmp_path, "a", cuda_gdb=True, FAKE_CUBLASLT_FAIL="1") == []
    out = tmp_path / "out"
    log = (out / "log-a.txt").read_text()
    assert (out / "cublaslt-off").exists() and "=== cublaslt off" in log
    assert "=== cublaslt crashed (status 139): again under cuda-gdb" in log and "#0  0x1 in crash ()" in log
    (gdb,) = [line for line in (tmp_path / "calls-a.txt").read_text().splitlines() if line.startswith("cuda-gdb")]
    assert " -ex run -ex bt 25 --args python3 benchmarks/scripts/cublaslt_check.py" in gdb, gdb
    assert not (out / "cudnn-direct-off").exists()
    later = [line for line in (tmp_path / "calls-a.txt").read_text().splitlines()
             if line.startswith(("-m pytest", "benchmarks/scripts/attention_dispatch.py"))]
    assert len(later) == 2 and all(line.endswith("|CUDNN=1|LT=0") for line in later)
    calls = _run(tmp_path, "b")
    assert calls and all(c.endswith("|CUDNN=1|LT=0") for c in calls)


def test_a_failed_weight_gradient_check_turns_that_call_alone_off(tmp_path):
    """The cuBLASLt check exits 3 (its DGELU call passed, its weight-gradient call did not): the
    rest of the lease, a later part's gpt_step too, runs with ZOO_CUBLASLT_WGRAD=0 and the DGELU
    call on."""
    assert _run(tmp_path, "a", FAKE_CUBLASLT_WGRAD_FAIL="1") == []
    out = tmp_path / "out"
    assert (out / "cublaslt-ZOO_CUBLASLT_WGRAD-off").exists() and not (out / "cublaslt-off").exists()
    assert "=== cublaslt: ZOO_CUBLASLT_WGRAD=0 for the rest of the lease" in (out / "log-a.txt").read_text()
    later = [line for line in (tmp_path / "calls-a.txt").read_text().splitlines()
             if line.startswith(("-m pytest", "benchmarks/scripts/attention_dispatch.py"))]
    assert len(later) == 2 and all(line.endswith("|LTW=0|CUDNN=1|LT=") for line in later)
    calls = _run(tmp_path, "b")
    assert calls and all(c.endswith("|LTW=0|CUDNN=1|LT=") for c in calls)


def test_a_passed_cudnn_direct_check_lets_auto_take_it_for_the_rest_of_the_lease(tmp_path):
    """The check passes: it appends `export ZOO_CUDNN_DIRECT=1` to its env file, and what runs
    after it in part a, and a later part's benchmarks, run with it (auto takes the direct call
    only when asked for); the check itself ran before that, and no cuda-gdb ran."""
    _run(tmp_path, "a", cuda_gdb=True)
    out = tmp_path / "out"
    assert (out / "cudnn-direct.env").read_text() == "export ZOO_CUDNN_DIRECT=1\n"
    lines = (tmp_path / "calls-a.txt").read_text().splitlines()
    check = [line for line in lines if line.startswith("benchmarks/scripts/cudnn_direct_check.py")]
    assert check and check[0].endswith("|CUDNN=|LT=")
    assert not any(line.startswith("cuda-gdb") for line in lines)
    later = [line for line in lines if line.startswith(("-m pytest", "benchmarks/scripts/attention_dispatch.py"))]
    assert len(later) == 2 and all("|CUDNN=1|" in line for line in later)
    calls = _run(tmp_path, "d")
    assert calls and all("|CUDNN=1|" in c for c in calls)


def test_what_the_cublaslt_check_chose_holds_for_the_rest_of_the_lease(tmp_path):
    """The check writes `export ZOO_CUBLASLT_WGRAD_EPILOGUE=...` to the file device.sh names
    (ZOO_CHECK_ENV_FILE): what runs after it in part a, and a later part's gpt_step, has it."""
    _run(tmp_path, "a")
    out = tmp_path / "out"
    assert (out / "cublaslt.env").read_text() == "export ZOO_CUBLASLT_WGRAD_EPILOGUE=bgrada\n"
    lines = (tmp_path / "calls-a.txt").read_text().splitlines()
    check = [line for line in lines if line.startswith("benchmarks/scripts/cublaslt_check.py")]
    assert check and "|EPI=|" in check[0]
    later = [line for line in lines if line.startswith(("-m pytest", "benchmarks/scripts/attention_dispatch.py"))]
    assert len(later) == 2 and all("|EPI=bgrada|" in line for line in later)
    calls = _run(tmp_path, "b")
    assert calls and all("|EPI=bgrada|" in c for c in calls)
