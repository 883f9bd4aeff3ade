"""The CLI: every kind of bad input is one `error:` line and status 2; list/train/sample/eval work."""

import json
import os

import pytest

from zoo import cli

TINY = ["batch_size=32", "log_every=5", "model.hidden=(32,)", "model.latent_dim=4", "model.eval_k=8"]


def err_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def test_list_names_every_model(capsys):
    from zoo import registry

    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == registry.names()
    assert {"vae", "ae"} <= set(registry.names())


@pytest.mark.parametrize("argv, must_say", [
    (["train", "nosuchmodel", "--workdir", "W"], ["unknown model 'nosuchmodel'", "vae"]),
    (["train", "vae", "--workdir", "W", "model.nosuch=3"], ["nosuch", "latent_dim"]),
    (["train", "vae", "--workdir", "W", "nosuch.x=3"], ["nosuch", "optimizer"]),
    (["train", "vae", "--workdir", "W", "batch_size=abc"], ["batch_size", "int"]),
    (["train", "vae", "--workdir", "W", "optimizer.lr=fast"], ["optimizer.lr", "float"]),
    (["train", "vae", "--workdir", "W", "optimizer.name=lion"], ["lion", "adam"]),
    (["train", "vae", "--workdir", "W", "parallel=spmd"], ["spmd", "pmap"]),
    (["train", "vae", "--workdir", "W", "model.likelihood=poisson"], ["poisson", "bernoulli"]),
    (["train", "vae", "--workdir", "W", "data.name=mnist9"], ["mnist9", "digits"]),
    (["train", "vae", "--workdir", "W", "steps=0"], ["steps"]),
    (["train", "vae", "--workdir", "W", "--parallel", "spmd"], ["spmd", "pmap"]),
    (["sample", "vae", "--workdir", "EMPTY"], ["config.json", "zoo train vae"]),
    (["eval", "vae", "--workdir", "EMPTY"], ["config.json", "zoo train vae"]),
    (["bench", "nosuchbench"], ["nosuchbench", "train_step"]),
    (["train", "vae", "--workdir", "W", "--seed", "-1"], ["seed must be in [0, 2**32), got -1"]),
    (["train", "vae", "--workdir", "W", "seed=4294967296"], ["seed must be in [0, 2**32)"]),
    (["train", "vae", "--workdir", "W", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     ["--process-id must be in [0, --num-processes=2), got 2"]),
    (["train", "vae", "--workdir", "W", "--coordinator", "h", "--num-processes", "2", "--process-id", "0"],
     ["--coordinator must be HOST:PORT, got 'h'"]),
    (["train", "vae", "--workdir", "W", "optimizer.b1=1.5"], ["optimizer.b1 must be in [0, 1), got 1.5"]),
    (["train", "vae", "--workdir", "W", "optimizer.warmup_steps=-1"], ["optimizer.warmup_steps must be >= 0"]),
    (["train", "vae", "--workdir", "W", "optimizer.grad_clip=-1"], ["optimizer.grad_clip must be >= 0"]),
    (["train", "vae", "--workdir", "W", "optimizer.weight_decay=-0.1"], ["optimizer.weight_decay must be >= 0"]),
    (["train", "vae", "--workdir", "W", "optimizer.lr=0"], ["optimizer.lr must be > 0, got 0"]),
    (["train", "vae", "--workdir", "W", "keep_checkpoints=0"], ["keep_checkpoints must be >= 1"]),
    (["train", "vae", "--workdir", "W", "eval.batch_size=0"], ["eval.batch_size must be >= 1"]),
    (["train", "vae", "--workdir", "W", "--config", "CFG.txt"], ["is not a Python file"]),
    (["train", "vae", "--workdir", "W", "--config", "BAD.py"], ["BAD.py: line 1: "]),
])
def test_bad_input_is_one_line_status_2(argv, must_say, capsys, tmp_path):
    (tmp_path / "CFG.txt").write_text("not python\n")
    (tmp_path / "BAD.py").write_text("def get_config(:\n")
    argv = [str(tmp_path / a) if a in ("W", "EMPTY", "CFG.txt", "BAD.py") else a for a in argv]
    assert cli.main(argv) == 2
    line = err_line(capsys)
    for text in must_say:
        assert text in line, line
    assert not os.path.exists(tmp_path / "W" / "checkpoints")  # nothing half-made


def test_nonfinite_loss_exits_1(monkeypatch, capsys, tmp_path):
    from zoo.train import loop

    def boom(*a, **k):
        raise loop.NonFiniteLoss(7)

    monkeypatch.setattr(loop, "train", boom)
    assert cli.main(["train", "vae", "--workdir", str(tmp_path), *TINY]) == 1
    assert err_line(capsys) == "error: non-finite loss at step 7"


def test_train_sample_eval(tmp_path, capsys):
    wd = str(tmp_path / "run")
    assert cli.main(["train", "vae", "--workdir", wd, "--steps", "20", "--no-progress", *TINY]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 20 and summary["preempted"] is False
    saved = json.load(open(os.path.join(wd, "config.json")))
    assert saved["name"] == "vae" and saved["steps"] == 20 and saved["model"]["latent_dim"] == 4
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [5, 10, 15, 20] and all("loss" in r for r in rows)

    out = str(tmp_path / "grid.png")
    assert cli.main(["sample", "vae", "--workdir", wd, "--n", "16", "--out", out]) == 0
    from PIL import Image

    img = Image.open(out)
    assert img.size[0] > 4 * 8 and img.mode == "L"

    assert cli.main(["eval", "vae", "--workdir", wd, "eval.max_examples=64"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["examples"] == 64 and ev["step"] == 20
    assert ev["nll_iwae"] <= -ev["elbo"] + 1e-3  # the IWAE bound is the tighter one

    # a second `train` with more steps resumes instead of starting over
    assert cli.main(["train", "vae", "--workdir", wd, "--steps", "30", "--no-progress", *TINY]) == 0
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    # a diffusion option on the vae: refused, not ignored
    assert cli.main(["sample", "vae", "--workdir", wd, "--label", "3"]) == 2
    assert "vae does not use --label; its sampling options: --n " in err_line(capsys)
    # wrong model for the workdir
    assert cli.main(["sample", "ae", "--workdir", wd]) == 2
    assert "holds a 'vae' run" in err_line(capsys)
    # resuming with another model or model config is refused, and the run is left as it was
    before = open(os.path.join(wd, "config.json")).read()
    assert cli.main(["train", "vae", "--workdir", wd, "--steps", "40", *TINY, "model.latent_dim=8"]) == 2
    err = err_line(capsys)
    assert "holds another run (model.latent_dim: 4 there, 8 now)" in err, err
    assert "hidden" not in err  # only what differs
    assert cli.main(["train", "ae", "--workdir", wd, "--steps", "40"]) == 2
    assert "name: 'vae' there, 'ae' now" in err_line(capsys)
    assert open(os.path.join(wd, "config.json")).read() == before
    # already at (or past) --steps: nothing to train, said so; the summary stays valid JSON
    capsys.readouterr()
    assert cli.main(["train", "vae", "--workdir", wd, "--steps", "20", "--no-progress", *TINY]) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1], parse_constant=lambda c: pytest.fail(f"JSON has {c}"))
    assert summary["step"] == 30 and summary["steps_per_sec"] is None
    assert "at step 30, not below steps=20: nothing to train" in err
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]


def test_python_dash_m_zoo_runs():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "zoo", "list"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "vae" in res.stdout


def test_lda_on_users_npz_counts_prints_topics_as_ids(tmp_path, capsys):
    import numpy as np

    r = np.random.default_rng(0)
    x = np.zeros((64, 12), np.int64)  # two planted topics: words 0-5 and words 6-11
    for d in range(64):
        t = d % 2
        x[d, 6 * t: 6 * t + 6] = r.multinomial(30, np.full(6, 1 / 6))
    path = tmp_path / "counts.npz"
    np.savez(path, x=x)
    wd = str(tmp_path / "lda")
    args = ["--workdir", wd, "--steps", "16", "--no-progress", f"data.name=npz:{path}", "batch_size=16",
            "model.num_topics=2", "model.num_docs=57", "log_every=8", "ckpt_every=16"]
    assert cli.main(["train", "lda", *args]) == 0
    capsys.readouterr()
    assert cli.main(["sample", "lda", "--workdir", wd, "--n", "6"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["topic 0", "topic 1"]
    tops = sorted(sorted(int(i) // 6 for i in line.split(":")[1].split()) for line in lines)
    assert tops == [[0] * 6, [1] * 6]  # each topic's six top words are one planted topic's


def test_workdir_that_is_a_file_or_cannot_be_made(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert cli.main(["train", "vae", "--workdir", str(tmp_path / "afile"), "--steps", "1", *TINY]) == 2
    assert err_line(capsys) == f"error: workdir {tmp_path / 'afile'} is a file, not a directory"
    assert (tmp_path / "afile").read_text() == "x"
    assert cli.main(["train", "vae", "--workdir", str(tmp_path / "afile" / "w"), "--steps", "1", *TINY]) == 2
    assert err_line(capsys).startswith(f"error: cannot create workdir {tmp_path / 'afile' / 'w'}: ")


def test_ctrl_c_outside_the_loop_is_one_line_status_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_eval", interrupted)
    assert cli.main(["eval", "vae", "--workdir", "W"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
