"""benchmarks/scripts/pallas_kernels.py (run on a lent GPU in device.sh part b) on this CPU, its
kernels in Pallas's interpreter: each kernel's tiling agrees with the XLA form it replaces, and
each gets a timing line against it."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_pallas_kernels_script():
    out = subprocess.run([sys.executable, "benchmarks/scripts/pallas_kernels.py", "--quick", "--rounds", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    kernels = ["lse", "xent", "ln-fwd", "ln-bwd", "ln-bwd3", "mlp-dgelu"]
    diffs = re.findall(r"^  (\S+) pallas \([\d, ]+\): max \|difference\| / max \|xla\|, worst output (\S+)$",
                       out.stdout, re.M)
    assert [k for k, _ in diffs] == kernels
    assert all(float(d) < 1e-5 for _, d in diffs), diffs  # float32: a few ulps, relative to each output's scale
    timed = re.findall(r"^(\S+) +(xla|pallas \([\d, ]+\)) +[\d.]+ ms .* speed vs xla \(paired\) ([\d.]+)$",
                       out.stdout, re.M)
    assert [(k, n.split()[0]) for k, n, _ in timed] == [(k, n) for k in kernels for n in ("xla", "pallas")]
    assert all(float(r) == 1.0 for _, n, r in timed if n == "xla")
    bad = subprocess.run([sys.executable, "benchmarks/scripts/pallas_kernels.py", "--kernels", "ln,lse"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown kernels ['ln']; known: lse, xent, ln-fwd, ln-bwd, ln-bwd3, mlp-dgelu" in bad.stderr


def test_a_kernel_or_tiling_that_fails_loses_only_its_own_lines(monkeypatch, capsys):
    """On a lease a tiling may not compile for the device: it is reported (FAILED, with the
    error's first line), the other tilings and kernels are still checked and timed, and the
    script exits 1 naming what failed."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "scripts"))
    try:
        import pallas_kernels as pk
    finally:
        sys.path.pop(0)
    real = pk.cases

    def cases(kernel, *args):
        if kernel == "xent":
            raise ValueError("Triton: out of shared memory")
        progs, moved = real(kernel, *args)

        def broken(*a):
            raise RuntimeError("ptxas fatal: too many resources requested")
        progs["pallas (9, 9, 9)"] = (broken, ())
        return progs, moved
    monkeypatch.setattr(pk, "cases", cases)
    monkeypatch.setattr(sys, "argv", ["pallas_kernels.py", "--quick", "--rounds", "1", "--kernels", "xent,lse"])
    assert pk.main() == 1
    out = capsys.readouterr().out
    assert "FAILED xent: ValueError: Triton: out of shared memory" in out
    assert "FAILED lse pallas (9, 9, 9): RuntimeError: ptxas fatal: too many resources requested" in out
    timed = re.findall(r"^lse +(xla|pallas \([\d, ]+\)) +[\d.]+ ms", out, re.M)
    assert timed == ["xla", f"pallas {pk.lse.TILE}"]  # the XLA form and the default tiling, not the broken one
    assert out.rstrip().endswith("failed: xent, lse pallas (9, 9, 9)")
