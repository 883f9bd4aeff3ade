"""gpt_step's PyTorch peer (zoo.bench.torch_gpt) is the zoo's model and step: the same logits from
the same weights, and the same first losses through three AdamW steps (forward, gradients and
optimizer all agree); without torch its rows are skipped with a note, nothing else lost."""

import dataclasses
import sys

import jax
import numpy as np
import optax
import pytest

from zoo.bench import gpt_step
from zoo.models.gpt import GPTConfig, forward, make_gpt
from zoo.train.state import init_state
from zoo.train.strategy import make_train_step

CFG = GPTConfig(vocab_size=64, max_len=16, num_layers=2, hidden=32, num_heads=2)


def test_peer_rows_are_skipped_without_torch(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    monkeypatch.setitem(sys.modules, "zoo.bench.torch_gpt", None)
    assert gpt_step.peer_rows(CFG, 2, iters=1, variant="torch") == []
    assert "torch is not installed" in capsys.readouterr().out


def _params(x, scale=8.0):
    """The zoo's init, scaled so activations are O(1) (GELU's tanh form differs from the exact
    one there; at init's small activations the two agree to ~1e-5)."""
    params = make_gpt(CFG).init(jax.random.PRNGKey(2), {"x": x})
    return jax.tree.map(lambda p: p * scale, params)


def test_peer_rows_are_skipped_when_torch_cannot_reach_the_zoos_device(monkeypatch, capsys):
    torch = pytest.importorskip("torch")

    class Gpu:
        platform = "gpu"

    monkeypatch.setattr(jax, "devices", lambda *a: [Gpu()])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpt_step.peer_rows(CFG, 2, iters=1, variant="torch") == []
    assert "no CUDA" in capsys.readouterr().out


def test_peer_computes_the_zoos_logits():
    torch = pytest.importorskip("torch")
    from zoo.bench import torch_gpt

    x = np.random.default_rng(1).integers(0, CFG.vocab_size, (3, CFG.max_len))
    params = _params(x)
    ours, _ = forward(CFG, params, x)
    assert float(np.std(np.asarray(ours))) > 1.0
    with torch.no_grad():
        theirs = torch_gpt.from_zoo(CFG, jax.device_get(params))(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(theirs, np.asarray(ours), rtol=1e-4, atol=1e-4)


def test_peer_steps_as_the_zoo_step_does():
    """Three AdamW steps from scaled weights with a large learning rate and weight decay, so the
    update's every term moves the loss: both sides' losses agree to float32 rounding."""
    torch = pytest.importorskip("torch")
    from zoo.bench import torch_gpt

    lr, wd = 3e-3, 0.5
    x = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, CFG.max_len + 1))
    params = _params(x)
    md, tx = make_gpt(CFG), optax.adamw(lr, weight_decay=wd)
    state, step = init_state(params, tx, 0.0), jax.jit(make_train_step(md, tx, 0.0))
    ours = []
    for _ in range(3):
        state, metrics = step(state, jax.random.PRNGKey(0), {"x": x})
        ours.append(float(metrics["loss"]))
    peer, _ = torch_gpt.make_step(CFG, jax.device_get(params), lr=lr, weight_decay=wd, device="cpu")
    theirs = [float(peer(torch.as_tensor(x))[0]) for _ in range(3)]
    assert abs(ours[2] - ours[0]) > 0.1  # the steps move the loss
    np.testing.assert_allclose(theirs, ours, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peer_rows(dtype):
    """The bench's rows; in bf16 (the full set's dtype: autocast on the peer's side) the first
    three losses still agree, to bf16's rounding."""
    pytest.importorskip("torch")
    cfg = dataclasses.replace(CFG, dtype=dtype)
    gpt_step._CEILINGS.clear()
    zoo_rows = gpt_step.step_rows(cfg, 2, iters=2)
    peer_rows = gpt_step.peer_rows(cfg, 2, iters=2, variant="torch")
    assert [r["impl"] for r in peer_rows] == ["torch-nanogpt", "torch-nanogpt-pipelined"]  # one ceiling row per run
    assert all(0 < r["mfu"] < 1 and r["value"] > 0 for r in peer_rows)
    np.testing.assert_allclose(peer_rows[0]["first_losses"], zoo_rows[0]["first_losses"],
                               rtol=2e-5 if dtype == "float32" else 1e-3)


def test_peer_refuses_what_gpt2_is_not():
    pytest.importorskip("torch")
    from zoo.bench import torch_gpt

    with pytest.raises(ValueError, match="mlp_ratio 4"):
        torch_gpt.TorchGPT(GPTConfig(vocab_size=64, max_len=16, num_layers=1, hidden=32, num_heads=2, mlp_ratio=2.0))
    with pytest.raises(ValueError, match="grouped-query"):
        torch_gpt.TorchGPT(GPTConfig(vocab_size=64, max_len=16, num_layers=1, hidden=32, num_heads=2, num_kv_heads=1))
