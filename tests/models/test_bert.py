"""BERT: the 80/10/10 masking, the MLM loss against NumPy, bidirectionality, training, filling
[MASK]s, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.errors import ConfigError, DataError
from zoo.models.bert import (BERT, MASK_TEXT, BERTConfig, encode_masked, fill_masks, grow_params, make_bert,
                             mask_tokens)

TINY = BERTConfig(max_len=32, num_layers=1, hidden=16, num_heads=2)


def _batch(b, t, seed=0, start=0):
    x = np.random.default_rng(seed).integers(0, 256, (b, t + 1)).astype(np.int32)
    return {"x": jnp.asarray(x), "idx": jnp.arange(start, start + b, dtype=jnp.int32)}


def test_masking_proportions_and_per_example_determinism():
    cfg = BERTConfig(max_len=100)
    batch = _batch(2000, 100)
    tokens = batch["x"][:, :-1]
    inputs, pos = mask_tokens(cfg, jax.random.key(0), tokens, batch["idx"])
    inputs, pos, tokens = map(np.asarray, (inputs, pos, tokens))
    M = cfg.num_masked(100)
    assert pos.shape == (2000, M) == (2000, 15)
    assert all(len(set(row)) == M for row in pos)  # distinct positions
    untouched = np.ones_like(tokens, bool)
    np.put_along_axis(untouched, pos, False, axis=1)
    np.testing.assert_array_equal(inputs[untouched], tokens[untouched])  # only chosen positions change
    chosen_in, chosen_tok = np.take_along_axis(inputs, pos, 1), np.take_along_axis(tokens, pos, 1)
    n = chosen_in.size
    frac_mask = (chosen_in == cfg.mask_id).mean()
    frac_same = (chosen_in == chosen_tok).mean()
    assert abs(frac_mask - 0.8) < 0.01
    # 10% kept, plus 1/256 of the random 10% that redraws the same byte
    assert abs(frac_same - (0.1 + 0.1 / 256)) < 0.006, (frac_same, n)
    # the same example (same global idx) gets the same corruption wherever it sits in the batch
    sub = {"x": batch["x"][5:9], "idx": batch["idx"][5:9]}
    again, pos2 = mask_tokens(cfg, jax.random.key(0), sub["x"][:, :-1], sub["idx"])
    np.testing.assert_array_equal(np.asarray(again), inputs[5:9])
    np.testing.assert_array_equal(np.asarray(pos2), pos[5:9])


def test_loss_is_cross_entropy_at_masked_positions():
    md = make_bert(TINY)
    batch = _batch(3, 20, seed=1)
    params = md.init(jax.random.key(0), batch)
    key = jax.random.key(7)
    loss, metrics = md.loss(params, key, batch)
    k_mask, _ = jax.random.split(key)
    inputs, pos = mask_tokens(TINY, k_mask, batch["x"][:, :-1], batch["idx"])
    logits = np.asarray(BERT(TINY).apply({"params": params}, inputs), np.float64)
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    tok = np.asarray(batch["x"][:, :-1])
    pos = np.asarray(pos)
    nll = [-lp[b, p, tok[b, p]] for b in range(3) for p in pos[b]]
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)
    acc = np.mean([lp[b, p].argmax() == tok[b, p] for b in range(3) for p in pos[b]])
    np.testing.assert_allclose(float(metrics["masked_accuracy"]), acc)


def test_encoder_sees_both_directions():
    params = make_bert(TINY).init(jax.random.key(0), _batch(1, 10))
    x = _batch(1, 10, seed=2)["x"][:, :-1]
    a = BERT(TINY).apply({"params": params}, x)
    b = BERT(TINY).apply({"params": params}, x.at[0, 9].set((x[0, 9] + 1) % 256))
    assert np.abs(np.asarray(a[0, 0] - b[0, 0])).max() > 1e-6  # position 0 reads position 9


def test_training_lowers_the_masked_loss(tmp_path, capsys):
    from zoo.cli import main
    from zoo.train.metrics import read_metrics

    wd = tmp_path / "bert"
    assert main(["train", "bert", "--workdir", str(wd), "--steps", "40", "--no-progress", "batch_size=16",
                 "model.hidden=32", "model.num_heads=2", "model.num_layers=1", "data.seq_len=32",
                 "model.max_len=32", "log_every=5", "optimizer.warmup_steps=0", "optimizer.lr=3e-3"]) == 0
    losses = [m["loss"] for m in read_metrics(str(wd / "metrics.jsonl"))]
    assert np.mean(losses[-2:]) < 0.85 * losses[0]
    assert main(["eval", "bert", "--workdir", str(wd), "eval.max_examples=64"]) == 0
    # grown one layer deeper from that run: starts where it ended, not from scratch
    wd2 = tmp_path / "bert_deeper"
    assert main(["train", "bert", "--workdir", str(wd2), "--steps", "5", "--no-progress", "batch_size=16",
                 "model.hidden=32", "model.num_heads=2", "model.num_layers=2", "data.seq_len=32",
                 "model.max_len=32", "log_every=1", "optimizer.warmup_steps=0", "optimizer.lr=3e-3",
                 f"model.init_from={wd}"]) == 0
    grown = [m["loss"] for m in read_metrics(str(wd2 / "metrics.jsonl"))]
    assert grown[0] < 0.9 * losses[0]
    assert main(["eval", "bert", "--workdir", str(wd2), "eval.max_examples=64"]) == 0
    capsys.readouterr()
    assert main(["train", "bert", "--workdir", str(tmp_path / "wider"), "--steps", "1", "--no-progress",
                 "model.hidden=64", "model.num_heads=2", "model.num_layers=2", "data.seq_len=32",
                 "model.max_len=32", f"model.init_from={wd}"]) != 0
    assert "only num_layers may grow" in capsys.readouterr().err


def test_grown_model_computes_the_trained_function():
    shallow, deep = BERTConfig(**{**TINY.__dict__, "num_layers": 1}), BERTConfig(**{**TINY.__dict__, "num_layers": 3})
    batch = _batch(2, 12)
    trained = make_bert(shallow).init(jax.random.key(0), batch)
    trained = jax.tree.map(lambda a: a + 0.01 * jnp.sin(jnp.arange(a.size).reshape(a.shape)), trained)
    grown = make_bert(deep, pretrained=trained).init(jax.random.key(1), batch)
    x = batch["x"][:, :-1]
    np.testing.assert_allclose(BERT(deep).apply({"params": grown}, x), BERT(shallow).apply({"params": trained}, x),
                               atol=1e-5)
    # the new blocks are not inert: their input projections are fresh, only the outputs start at 0
    assert float(jnp.abs(grown["encoder"]["block_2"]["attn"]["query"]["kernel"]).max()) > 0
    assert float(jnp.abs(grown["encoder"]["block_2"]["mlp"]["proj"]["kernel"]).max()) == 0
    with pytest.raises(ConfigError, match="deeper from a checkpoint, not shallower"):
        grow_params(grown, trained, shallow)


@pytest.mark.parametrize("bad, match", [(dict(hidden=30, num_heads=4), "multiple"),
                                         (dict(mask_rate=0.0), "mask_rate"), (dict(num_layers=0), "num_layers")])
def test_bad_config(bad, match):
    with pytest.raises(ConfigError, match=match):
        BERTConfig(**bad)


def test_wrong_data_kind():
    from zoo import registry

    with pytest.raises(DataError, match="text source"):
        registry.get("bert").build(registry.get("bert").config().model, {"kind": "image", "shape": (8, 8, 1)})


def test_init_from_a_missing_or_foreign_workdir(tmp_path):
    from zoo import registry
    from zoo.errors import ZooError

    entry = registry.get("bert")
    info = {"kind": "text", "shape": (33,), "vocab_size": 256}
    cfg = entry.config().model
    with cfg.unlocked():
        cfg.max_len, cfg.init_from = 32, str(tmp_path / "nothing")
    with pytest.raises(ZooError, match="config.json: train first"):
        entry.build(cfg, info)
    (tmp_path / "gpt_run").mkdir()
    (tmp_path / "gpt_run" / "config.json").write_text('{"name": "gpt"}')
    with cfg.unlocked():
        cfg.init_from = str(tmp_path / "gpt_run")
    with pytest.raises(ZooError, match="holds a 'gpt' run, not 'bert'"):
        entry.build(cfg, info)


def _sharp_params(cfg, seed=0):
    """Init params with a perturbation, so logits differ clearly between bytes and positions."""
    params = make_bert(cfg).init(jax.random.key(seed), _batch(1, 8))
    return jax.tree.map(lambda a: a + 0.3 * jnp.sin(jnp.arange(a.size).reshape(a.shape) * 1.7 + seed), params)


def _log_softmax64(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _reference_fill(cfg, params, tokens):
    """Greedy most-confident-first filling, one row and one position at a time, in NumPy."""
    out = np.array(tokens)
    apply = jax.jit(lambda row: BERT(cfg).apply({"params": params}, row[None])[0])
    for row in out:
        while (row == cfg.mask_id).any():
            lp = _log_softmax64(apply(jnp.asarray(row)))
            conf = np.where(row == cfg.mask_id, lp.max(-1), -np.inf)
            p = int(conf.argmax())
            row[p] = int(lp[p].argmax())
    return out


def test_fill_masks_greedy_matches_a_numpy_loop():
    params = _sharp_params(TINY)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 256, (4, 12)).astype(np.int32)
    tokens[0, [2, 3, 4, 9]] = TINY.mask_id       # a span and one alone
    tokens[1, 0] = TINY.mask_id                  # one
    tokens[3, :] = TINY.mask_id                  # every position
    # row 2: no mask, returned as it is
    got = np.asarray(fill_masks(TINY, params, jax.random.key(0), tokens))
    want = _reference_fill(TINY, params, tokens)
    np.testing.assert_array_equal(got, want)
    assert not (got == TINY.mask_id).any()
    unmasked = tokens != TINY.mask_id
    np.testing.assert_array_equal(got[unmasked], tokens[unmasked])
    # one mask: the argmax of the logits at its position
    lp = _log_softmax64(BERT(TINY).apply({"params": params}, jnp.asarray(tokens[1:2])))
    assert got[1, 0] == lp[0, 0].argmax()
    # the fills of a span depend on each other: not what one pass predicts at every position
    lp0 = _log_softmax64(BERT(TINY).apply({"params": params}, jnp.asarray(tokens[3:4])))[0]
    assert (got[3] != lp0.argmax(-1)).any()
    # jitted, and top_k=1 at any temperature is greedy
    jitted = jax.jit(lambda t: fill_masks(TINY, params, jax.random.key(5), t, temperature=2.0, top_k=1))
    np.testing.assert_array_equal(np.asarray(jitted(tokens)), want)


def test_fill_masks_samples_from_the_filtered_softmax():
    params = _sharp_params(TINY, seed=1)
    row = np.random.default_rng(4).integers(0, 256, 10).astype(np.int32)
    row[6] = TINY.mask_id
    n = 4000
    got = np.asarray(fill_masks(TINY, params, jax.random.key(2), np.tile(row, (n, 1)), temperature=0.7, top_k=4))
    np.testing.assert_array_equal(np.delete(got, 6, 1), np.tile(np.delete(row, 6), (n, 1)))
    logits = np.asarray(BERT(TINY).apply({"params": params}, jnp.asarray(row[None]))[0, 6], np.float64)
    top = np.argsort(-logits)[:4]
    p = np.exp((logits[top] - logits[top].max()) / 0.7)
    p /= p.sum()
    freq = np.array([(got[:, 6] == b).mean() for b in top])
    assert freq.sum() == 1.0  # only the top 4 bytes are drawn
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(0.25 / n) + 1e-3)


def test_generate_fills_a_prompt_and_says_what_it_needs():
    cfg = TINY
    md = make_bert(cfg)
    params = _sharp_params(cfg)
    prompt = f"ab{MASK_TEXT}{MASK_TEXT}cd{MASK_TEXT}"
    tokens = encode_masked(prompt, cfg)
    np.testing.assert_array_equal(tokens, [97, 98, cfg.mask_id, cfg.mask_id, 99, 100, cfg.mask_id])
    out = md.generate(params, jax.random.key(0), {"prompt": prompt})["text"]
    filled = np.asarray(fill_masks(cfg, params, jax.random.key(0), tokens[None]))[0]
    assert out == [prompt, "-> " + bytes(filled.astype(np.uint8).tolist()).decode("utf-8", errors="replace")]
    assert len(md.generate(params, jax.random.key(0), {"prompt": prompt, "temperature": 1.0, "n": 3})["text"]) == 4
    with pytest.raises(DataError, match=r"put \[MASK\] in --prompt"):
        md.generate(params, jax.random.key(0), {"prompt": "no masks here"})
    with pytest.raises(DataError, match="over the model's max_len=32"):
        md.generate(params, jax.random.key(0), {"prompt": "x" * 30 + MASK_TEXT * 3})
