"""seq2seq: greedy lax.scan decoding against a Python loop, attention masking, padding invariance,
training lowers the loss, config errors, and `zoo sample seq2seq` writing attention.png."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zoo.models  # noqa: F401  (registers the models)
from zoo import registry
from zoo.data import dates, load
from zoo.errors import ConfigError, DataError
from zoo.models.seq2seq import PAD, Seq2SeqConfig, _nll_B, make_seq2seq, make_seq2seq_fns

V = len(dates.VOCAB)
TINY = dict(vocab_size=V, embed_dim=8, hidden=16, attn_dim=8)
TEXTS = ["3rd of march, 1999", "07/04/76", "WEDNESDAY, SEPTEMBER 23RD, 1999", "1999.3.3"]


def _x(texts=TEXTS, length=dates.INPUT_LEN):
    return jnp.asarray(dates.encode_batch(texts, length))


def _batch(n=32, start=0):
    b = load("dates")[np.arange(start, start + n)]
    return {"x": jnp.asarray(b["x"]), "y": jnp.asarray(b["y"]), "idx": jnp.arange(n, dtype=jnp.int32)}


@pytest.fixture(scope="module", params=["bahdanau", "luong"])
def fns_params(request):
    """The pure functions, params, and the greedy decode of TEXTS (tokens [B, T], weights [B, T, S])."""
    fns = make_seq2seq_fns(Seq2SeqConfig(attention=request.param, **TINY))
    fns = fns._replace(encode=jax.jit(fns.encode))  # compiled once, shared by the tests below
    params = jax.jit(fns.init)(jax.random.key(0), _x())
    return fns, params, jax.jit(fns.run_greedy, static_argnums=2)(params, _x(), 11)


def test_greedy_scan_equals_python_loop(fns_params):
    fns, params, (tok_BxT, w_BxTxS) = fns_params
    x = _x()
    keys, carry, mask = fns.encode(params, x)
    step = jax.jit(fns.decoder_step)
    tok = jnp.full((x.shape[0],), dates.BOS, jnp.int32)
    toks, ws = [], []
    for _ in range(11):
        carry, (logits, w) = step(params, carry, tok, keys, mask)
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        toks.append(tok)
        ws.append(w)
    np.testing.assert_array_equal(tok_BxT, np.stack(toks, 1))
    np.testing.assert_allclose(w_BxTxS, np.stack(ws, 1), atol=1e-6)
    # teacher forcing on the greedy output replays the same steps
    y_in = jnp.concatenate([jnp.full((x.shape[0], 1), dates.BOS), tok_BxT[:, :-1]], 1)
    logits_tf, w_tf = jax.jit(fns.run_teacher_forced)(params, x, y_in)
    np.testing.assert_array_equal(jnp.argmax(logits_tf, -1), tok_BxT)
    np.testing.assert_allclose(w_tf, w_BxTxS, atol=1e-5)


def test_attention_weights_sum_to_one_over_inputs_and_skip_pads(fns_params):
    _, _, (_, w_BxTxS) = fns_params
    x = _x()
    lengths = np.array([len(t) for t in TEXTS])
    pad_BxS = np.arange(x.shape[1])[None, :] >= lengths[:, None]
    np.testing.assert_allclose(np.sum(w_BxTxS, -1), 1.0, rtol=1e-5)
    assert np.all(np.asarray(w_BxTxS)[np.broadcast_to(pad_BxS[:, None, :], w_BxTxS.shape)] == 0.0)
    assert np.all(np.asarray(w_BxTxS)[:, :, 0] > 0)


def test_padding_length_does_not_change_anything(fns_params):
    """The backward GRU starts at each input's last character, so extra pads change nothing."""
    fns, params, _ = fns_params
    k32, c32, _ = fns.encode(params, _x(length=32))
    k40, c40, _ = fns.encode(params, _x(length=40))
    for i, t in enumerate(TEXTS):
        np.testing.assert_allclose(k32[i, :len(t)], k40[i, :len(t)], atol=1e-5)
    np.testing.assert_allclose(c32[0], c40[0], atol=1e-5)  # the decoder's first state


def test_training_lowers_loss_and_evaluate_shapes():
    """(luong trains through the loop in the CLI test below)"""
    model = make_seq2seq(**TINY, attention="bahdanau")
    batch = _batch(32)
    params = jax.jit(model.init)(jax.random.key(0), batch)
    opt = optax.adam(1e-2)

    def step(carry, _):
        params, opt_state = carry
        (loss, _), grads = jax.value_and_grad(model.loss, has_aux=True)(params, None, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.jit(lambda c: jax.lax.scan(step, c, None, length=30))((params, opt.init(params)))
    losses = np.asarray(losses)
    assert np.isfinite(losses).all() and losses[-5:].mean() < 0.6 * losses[:3].mean(), losses
    ev = jax.jit(model.evaluate)(params, None, batch)
    assert set(ev) == {"exact_match", "token_accuracy", "nll"}
    assert all(v.shape == (32,) for v in ev.values())
    assert ((ev["token_accuracy"] >= 0) & (ev["token_accuracy"] <= 1)).all()
    np.testing.assert_array_equal(ev["exact_match"], ev["token_accuracy"] == 1.0)


def test_pad_targets_are_not_scored():
    logits_BxTxV = jax.random.normal(jax.random.key(0), (3, 5, V))
    tgt_BxT = jnp.array([[5, 6, 7, 2, 0], [5, 6, 2, 0, 0], [5, 6, 7, 8, 2]])
    nll_B = _nll_B(logits_BxTxV, tgt_BxT, tgt_BxT != PAD)
    log_p = np.asarray(jax.nn.log_softmax(logits_BxTxV, -1))
    for b in range(3):
        n = int(np.sum(np.asarray(tgt_BxT[b]) != PAD))
        np.testing.assert_allclose(nll_B[b], -np.mean([log_p[b, t, tgt_BxT[b, t]] for t in range(n)]),
                                   rtol=1e-5)


def test_config_and_data_errors():
    with pytest.raises(ConfigError, match="bahdanau, luong"):
        make_seq2seq(vocab_size=V, attention="transformer")
    with pytest.raises(ConfigError, match="hidden"):
        make_seq2seq(vocab_size=V, hidden=0)
    entry = registry.get("seq2seq")
    info = load("dates").info
    cfg = entry.config()
    cfg.model.attention = "dot"
    with pytest.raises(ConfigError, match="unknown attention 'dot'; valid: bahdanau, luong"):
        entry.build(cfg.model, info)
    cfg = entry.config()
    cfg.model.unlisted = 1
    with pytest.raises(ConfigError, match="attn_dim"):
        entry.build(cfg.model, info)
    with pytest.raises(DataError, match="seq2seq data source"):
        entry.build(entry.config().model, load("digits").info)
    model = entry.build(entry.config().model, info)
    with pytest.raises(DataError, match="batch\\['y'\\]"):
        model.init(jax.random.key(0), {"x": _x(), "idx": jnp.arange(4)})


def test_cli_train_sample_eval_writes_attention_png(tmp_path, capsys):
    from PIL import Image

    from zoo import cli

    wd = str(tmp_path / "s2s")
    tiny = ["batch_size=32", "log_every=1", "ckpt_every=20", "model.hidden=16", "model.embed_dim=8",
            "model.attn_dim=8", "model.attention=luong", "optimizer.lr=0.01", "optimizer.warmup_steps=0"]
    assert cli.main(["train", "seq2seq", "--workdir", wd, "--steps", "20", "--no-progress", *tiny]) == 0
    capsys.readouterr()
    losses = [json.loads(line)["loss"] for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert len(losses) == 20 and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2]), losses
    assert cli.main(["sample", "seq2seq", "--workdir", wd]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" -> ")[0] for line in lines[:-1]] == list(dates.EXAMPLES)
    assert lines[-1] == os.path.join(wd, "attention.png")
    img = Image.open(lines[-1])
    assert img.mode == "L" and img.size[0] > 200 and img.size[1] > 150  # labelled, 16 px cells

    assert cli.main(["sample", "seq2seq", "--workdir", wd, "--prompt", "3 März 1999"]) == 2
    assert "not in the vocabulary" in capsys.readouterr().err
