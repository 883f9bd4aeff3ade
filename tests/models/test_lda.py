"""lda through the loop: recovers planted topics, held-out perplexity falls; npz counts; errors."""

import jax
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from tests.train.helpers import run
from zoo import registry
from zoo.data.source import ArraySource
from zoo.errors import ConfigError, DataError
from zoo.train.loop import train

K_TRUE, V = 4, 40
K_FIT = 6  # a couple of spare topics: with exactly K_TRUE, online VB often merges two and kills one


def true_topics():
    """K_TRUE sparse topics over V words (Dirichlet(0.1) draws): [K, V], rows sum to 1."""
    return np.random.default_rng(123).dirichlet(np.full(V, 0.1), K_TRUE)


def corpus(num_docs, seed, words=60):
    """Documents of the LDA generative process: theta ~ Dir(0.3), counts ~ Mult(words, theta @ beta)."""
    r = np.random.default_rng(seed)
    theta = r.dirichlet(np.full(K_TRUE, 0.3), num_docs)
    x = np.stack([r.multinomial(words, p) for p in theta @ true_topics()]).astype(np.float32)
    return x


def perplexity(model, params, x, batch_size):
    """What `zoo eval` reports: exp(sum neg_bound / sum words), the split in batches of batch_size."""
    fn, nb, words = jax.jit(model.evaluate), 0.0, 0.0
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        out = fn(params, jax.random.PRNGKey(0),
                 {"x": chunk, "idx": np.arange(start, start + len(chunk), dtype=np.int32)})
        nb, words = nb + float(np.sum(out["neg_bound"])), words + float(np.sum(out["words"]))
    return np.exp(nb / words)


def test_recovers_planted_topics_and_perplexity_falls():
    x, x_test = corpus(600, 0), corpus(100, 1)
    src = ArraySource({"x": x}, {"kind": "bow", "name": "planted", "num_examples": len(x)})
    c = registry.get("lda").config()
    c.name, c.batch_size, c.steps, c.log_every, c.model.num_topics = "lda", 64, 30, 10, K_FIT
    model = registry.get("lda").build(c.model, src.info)
    init = model.init(jax.random.PRNGKey(0), {"x": x[:2], "idx": np.arange(2)})
    result = train(model, c, src, show_progress=False)
    lam = np.asarray(result.state.params["lam"])

    # every planted topic is found among the learned ones (lambda rows, normalised)
    learned = lam / lam.sum(1, keepdims=True)
    beta = true_topics()
    cos = (learned @ beta.T) / np.linalg.norm(learned, axis=1)[:, None] / np.linalg.norm(beta, axis=1)
    rows, cols = linear_sum_assignment(-cos)
    assert cos[rows, cols].min() > 0.9, cos
    top = np.asarray(model.sample(result.state.params, jax.random.PRNGKey(0), 3))
    assert top.shape == (K_FIT, 3) and top.dtype == np.int32
    np.testing.assert_array_equal(top[:, 0], lam.argmax(1))

    before = perplexity(model, init, x_test, 100)
    after = perplexity(model, result.state.params, x_test, 100)
    assert after < 0.8 * before
    # the corpus term is charged once per split, so the figure does not depend on the eval batch size
    np.testing.assert_allclose(perplexity(model, result.state.params, x_test, 32), after, rtol=1e-5)


def test_npz_counts(tmp_path):
    x = corpus(200, 2).astype(np.int64)
    np.savez(tmp_path / "counts.npz", x=x)
    c = registry.get("lda").config()
    c.name, c.data.name, c.batch_size, c.steps, c.log_every = "lda", f"npz:{tmp_path}/counts.npz", 32, 3, 1
    c.model.num_topics = K_TRUE
    with pytest.raises(ConfigError, match="num_docs"):  # an npz source does not report its size
        run(c, tmp_path / "run")
    c.model.num_docs = 180  # the 90% train part
    result = run(c, tmp_path / "run2")
    assert result.step == 3 and np.isfinite(result.metrics["loss"])
    assert np.asarray(result.state.params["lam"]).shape == (K_TRUE, V)


def test_bad_config_and_data():
    info = {"kind": "bow", "shape": (30,), "name": "x", "num_examples": 10}
    entry = registry.get("lda")
    for key, value, match in (("kappa", 0.3, "kappa"), ("alpha", 0.0, "alpha"), ("num_topics", 0, "num_topics")):
        c = entry.config().model
        c[key] = value
        with pytest.raises(ConfigError, match=match):
            entry.build(c, info)
    with pytest.raises(ConfigError, match="num_docs"):
        entry.build(entry.config().model, dict(info, num_examples=0))
    with pytest.raises(DataError, match="bag-of-words"):
        entry.build(entry.config().model, dict(info, shape=(8, 8, 1)))
    c = entry.config().model
    with c.unlocked():
        c.topics = 5
    with pytest.raises(ConfigError, match="topics"):
        entry.build(c, info)
    model = entry.build(entry.config().model, info)
    with pytest.raises(DataError, match="counts"):
        model.init(jax.random.PRNGKey(0), {"x": np.ones((2, 31), np.float32), "idx": np.arange(2)})
