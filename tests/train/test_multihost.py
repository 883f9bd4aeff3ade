"""Two processes joined by jax.distributed on 127.0.0.1 train exactly like one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ARGS = ["--no-progress", "--steps", "8", "batch_size=32", "log_every=1", "model.hidden=(32,)",
        "model.latent_dim=4", "model.eval_k=8"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def _losses(workdir) -> np.ndarray:
    return np.array([json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))])


@pytest.mark.timeout(600)
def test_two_processes_equal_one(tmp_path):
    one = tmp_path / "one"
    res = subprocess.run([sys.executable, "-m", "zoo", "train", "vae", "--workdir", str(one), *ARGS],
                         env=_env(4), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr

    two, port = tmp_path / "two", _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "zoo", "train", "vae", "--workdir", str(two), *ARGS,
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert len(_losses(two)) == 8
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=2e-5)
    # both processes agree on the final metrics they print
    finals = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert finals[0]["loss"] == pytest.approx(finals[1]["loss"], rel=1e-6)
