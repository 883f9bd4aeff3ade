"""Checkpoints: bitwise resume, SIGTERM, non-finite loss, corrupt checkpoint fallback."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.helpers import flat, losses, run, tiny_vae_config
from zoo.models.base import ModelDef
from zoo.train.loop import NonFiniteLoss, train


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    wd = tmp_path_factory.mktemp("straight")
    result = run(tiny_vae_config(steps=60, ckpt_every=10), wd)
    return losses(wd), flat(result.state.params), flat(result.state.opt_state)


def test_resume_is_bitwise(straight, tmp_path):
    run(tiny_vae_config(steps=30, ckpt_every=10), tmp_path)
    result = run(tiny_vae_config(steps=60, ckpt_every=10), tmp_path)
    assert result.step == 60
    np.testing.assert_array_equal(losses(tmp_path), straight[0])
    np.testing.assert_array_equal(flat(result.state.params), straight[1])
    np.testing.assert_array_equal(flat(result.state.opt_state), straight[2])


@pytest.mark.parametrize("damage", ["garbage", "partial"])
def test_corrupt_latest_checkpoint_falls_back(straight, tmp_path, capsys, damage):
    run(tiny_vae_config(steps=40, ckpt_every=10), tmp_path)
    latest = tmp_path / "checkpoints" / "40"
    assert latest.exists()
    if damage == "partial":  # a write that died half way: the state's files are gone
        shutil.rmtree(latest / "state")
    for root, _, files in os.walk(latest / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    result = run(tiny_vae_config(steps=60, ckpt_every=10), tmp_path)
    err = capsys.readouterr().err
    assert "checkpoint at step 40" in err and "corrupt or partial" in err and "step 30" in err
    np.testing.assert_array_equal(flat(result.state.params), straight[1])
    np.testing.assert_array_equal(losses(tmp_path), straight[0])
    assert len(os.listdir(str(tmp_path / "checkpoints") + "-unreadable")) == 1  # kept, not deleted


def _diverging_model() -> ModelDef:
    """loss = -w^2 under SGD with lr 0.5: w doubles every step until w^2 overflows float32."""

    def loss(params, key, batch):
        return -jnp.sum(params["w"] ** 2), {}

    return ModelDef(init=lambda key, batch: {"w": jnp.ones(())}, loss=loss)


def test_nonfinite_loss_stops_and_keeps_last_good(tmp_path):
    from zoo.data import load

    config = tiny_vae_config(steps=500, ckpt_every=20)
    config.optimizer.name, config.optimizer.lr, config.optimizer.momentum = "sgd", 0.5, 0.0
    with pytest.raises(NonFiniteLoss) as err:
        train(_diverging_model(), config, load("digits_binary"), workdir=str(tmp_path), show_progress=False)
    # w_t = 2^t, loss = -4^t: -inf once 4^t = 2^(2t) passes float32's 2^128 (t = 64, step 65)
    assert err.value.step == 65
    assert str(err.value) == "non-finite loss at step 65"
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert saved and max(saved) == 60
    assert np.isfinite(losses(tmp_path)).all() and len(losses(tmp_path)) == 64


def _cli(*args, env=None):
    return [sys.executable, "-m", "zoo", *args]


def _cli_with_ctrl_c(*args):
    """`zoo ARGS` with SIGINT as a shell's foreground command has it, Python's KeyboardInterrupt:
    a CI runner may start us with SIGINT ignored, which children inherit and Python keeps."""
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "sys.argv[0] = 'zoo'; from zoo.cli import main; raise SystemExit(main())")
    return [sys.executable, "-c", code, *args]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_and_resume_matches(straight, tmp_path, signum):
    """SIGTERM (a scheduler's preemption) and Ctrl-C save a checkpoint at the step they arrive and
    stop; the same command resumes to the straight run's losses. Ctrl-C exits 130 with one line
    saying so, SIGTERM 0."""
    env = dict(os.environ)  # conftest's XLA_FLAGS: 8 devices and the same codegen as `straight`
    common = ["--workdir", str(tmp_path), "--no-progress", "batch_size=32", "log_every=1",
              "ckpt_every=1000", "model.hidden=(32,)", "model.latent_dim=4", "model.eval_k=8",
              "fsdp_min_size=64"]
    proc = subprocess.Popen(_cli_with_ctrl_c("train", "vae", "--steps", "100000", *common), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 20):
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    if signum == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("interrupted at step ")
        assert "checkpoint saved: the same command resumes" in err
    else:
        assert proc.returncode == 0, err
    saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
    assert len(saved) == 1 and saved[0] >= 20
    assert '"preempted": true' in out
    # resume to 60 (the checkpoint may be past 60 only if the machine was very slow)
    if saved[0] <= 60:
        res = subprocess.run(_cli("train", "vae", "--steps", "60", *common), env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        np.testing.assert_array_equal(losses(tmp_path), straight[0])


def test_cli_unreadable_only_checkpoint_is_one_error_line(tmp_path):
    """The only checkpoint damaged: `zoo train` and `zoo eval` exit 2 with one line naming the
    array that could not be read, and the checkpoint stays where it was.

    Without the filters in zoo.train.checkpoint, orbax's other reads of the same restore, failing
    after it had raised, printed their TensorStore specs (~60 lines each) as the process ended.
    """
    common = ["--workdir", str(tmp_path), "--no-progress", "batch_size=32", "ckpt_every=1000",
              "model.hidden=(32,)", "model.latent_dim=4", "model.eval_k=8"]
    res = subprocess.run(_cli("train", "vae", "--steps", "3", *common), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    data = tmp_path / "checkpoints" / "3" / "state"
    blobs = [os.path.join(r, n) for r, _, names in os.walk(data) for n in names
             if os.sep + "d" + os.sep in os.path.join(r, n)]
    assert blobs
    for path in blobs:  # the arrays' bytes: a short, wrong chunk where each was
        with open(path, "wb") as f:
            f.write(os.urandom(200))
    for args in (("train", "vae", "--steps", "6", *common), ("eval", "vae", "--workdir", str(tmp_path))):
        res = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=300)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert lines[0].startswith("error: checkpoint at step 3 ") and "no readable checkpoint" in lines[0]
        assert "Error reading" in lines[0] and "TensorStore" not in lines[0]
        assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
