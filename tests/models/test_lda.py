"""lda through the loop: recovers planted topics; perplexity falls; bad config and data errors."""

import jax
import numpy as np
import pytest

from zoo import registry
from zoo.data.source import ArraySource
from zoo.errors import ConfigError, DataError
from zoo.train.loop import train


def planted(num_docs, seed):
    """3 topics over 30 words, each on its own 10 words; each doc mixes 1-2 topics."""
    r = np.random.default_rng(seed)
    x = np.zeros((num_docs, 30), np.float32)
    for d in range(num_docs):
        for t in r.choice(3, size=r.integers(1, 3), replace=False):
            x[d, 10 * t: 10 * t + 10] += r.multinomial(20, np.full(10, 0.1))
    return ArraySource({"x": x}, {"kind": "bow", "name": "planted", "num_examples": num_docs})


def test_recovers_planted_topics_and_perplexity_falls():
    src, test = planted(400, 0), planted(100, 1)
    c = registry.get("lda").config()
    c.name, c.batch_size, c.steps, c.log_every, c.model.num_topics = "lda", 48, 40, 10, 3
    model = registry.get("lda").build(c.model, src.info)
    x_test = {"x": test.arrays["x"], "idx": np.arange(100, dtype=np.int32)}

    def perplexity(params):
        out = jax.jit(model.evaluate)(params, jax.random.PRNGKey(0), x_test)
        return float(np.exp(np.sum(out["neg_bound"]) / np.sum(out["words"])))

    init = model.init(jax.random.PRNGKey(0), x_test)
    result = train(model, c, src, show_progress=False)
    top = np.asarray(model.sample(result.state.params, jax.random.PRNGKey(0), 10))
    assert sorted(tuple(sorted(set(row // 10))) for row in top) == [(0,), (1,), (2,)]
    assert perplexity(result.state.params) < 0.8 * perplexity(init)


def test_bad_config_and_data():
    info = {"kind": "bow", "shape": (30,), "name": "x", "num_examples": 10}
    c = registry.get("lda").config().model
    c.kappa = 0.3
    with pytest.raises(ConfigError, match="kappa"):
        registry.get("lda").build(c, info)
    with pytest.raises(ConfigError, match="num_docs"):
        registry.get("lda").build(registry.get("lda").config().model, dict(info, num_examples=0))
    with pytest.raises(DataError, match="bag-of-words"):
        registry.get("lda").build(registry.get("lda").config().model, dict(info, shape=(8, 8, 1)))
