"""The rbm model through the loop: learning measured by exact log-likelihood, AIS eval, PCD state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import registry
from zoo.data import load
from zoo.errors import ConfigError
from zoo.models.rbm import make_rbm
from zoo.ops import gibbs
from zoo.train.loop import train


def config(**model):
    c = registry.get("rbm").config()
    c.name, c.steps, c.batch_size, c.log_every = "rbm", 300, 64, 50
    c.model.num_hidden, c.model.ais_chains, c.model.ais_betas = 8, 200, 3000
    for k, v in model.items():
        c.model[k] = v
    return c


def exact_ll(params, x):
    v = jnp.asarray(x.reshape(len(x), -1), jnp.float32)
    return float(jnp.mean(gibbs.log_likelihood(params, v, gibbs.exact_log_partition(params))))


@pytest.fixture(scope="module")
def data():
    train_src, test = load("digits_binary"), load("digits_binary", "test")
    return train_src, test[np.arange(len(test))]


@pytest.fixture(scope="module")
def trained(data):
    c = config()
    model = registry.get("rbm").build(c.model, data[0].info)
    return model, train(model, c, data[0], show_progress=False)


def test_training_raises_exact_test_log_likelihood(trained, data):
    model, result = trained
    init = model.init(jax.random.PRNGKey(0), data[1])
    before, after = exact_ll(init, data[1]["x"]), exact_ll(result.state.params, data[1]["x"])
    assert after > before + 3.0, (before, after)  # nats per digit; init = the pixel marginals


def test_ais_eval_matches_exact(trained, data):
    model, result = trained
    out = jax.jit(model.evaluate)(result.state.params, jax.random.PRNGKey(1), data[1])
    exact = exact_ll(result.state.params, data[1]["x"])
    assert abs(float(jnp.mean(out["log_likelihood"])) - exact) < 0.2


def test_pcd_chains_live_in_extra(data):
    c = config(persistent=True)
    c.steps = 5
    model = registry.get("rbm").build(c.model, data[0].info)
    first = model.init_extra(jax.random.PRNGKey(0), {"x": data[0][np.arange(64)]["x"]})
    result = train(model, c, data[0], show_progress=False)
    chains = np.asarray(result.state.extra["chains"])
    assert chains.shape == (64, 64) and set(np.unique(chains)) <= {0.0, 1.0}
    assert not np.array_equal(chains, np.asarray(first["chains"]))


def test_sample_range_and_shape(trained):
    model, result = trained
    x = np.asarray(model.sample(result.state.params, jax.random.PRNGKey(0), 6))
    assert x.shape == (6, 8, 8, 1) and x.min() >= 0 and x.max() <= 1


@pytest.mark.parametrize("bad", [{"cd_k": 0}, {"num_hidden": 0}, {"ais_betas": 1}])
def test_bad_config(bad):
    with pytest.raises(ConfigError):
        make_rbm(data_shape=(8, 8, 1), **bad)
    with pytest.raises(ConfigError, match="unknown model key"):
        registry.get("rbm").build(config(nosuch=1).model, {"shape": (8, 8, 1)})


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_grbm_learns_real_valued_digits(learn_sigma):
    c = registry.get("grbm").config()
    c.name, c.steps, c.log_every = "grbm", 300, 50
    c.model.num_hidden, c.model.learn_sigma, c.model.sample_steps = 32, learn_sigma, 50
    src, test = load("digits"), load("digits", "test")
    tx = test[np.arange(len(test))]
    model = registry.get("grbm").build(c.model, src.info)
    result = train(model, c, src, show_progress=False)
    err = float(np.mean(model.evaluate(result.state.params, jax.random.PRNGKey(0), tx)["recon_error"]))
    xt = tx["x"].reshape(len(tx["x"]), -1)
    mean_image = src[np.arange(len(src))]["x"].reshape(len(src), -1).mean(0)
    baseline = float(np.mean(np.sum((xt - mean_image) ** 2, -1)))  # predict the mean digit
    assert err < 0.5 * baseline, (err, baseline)
    if learn_sigma:
        assert not np.allclose(np.asarray(result.state.params["rbm"]["log_sigma"]), 0.0)
    x = np.asarray(model.sample(result.state.params, jax.random.PRNGKey(0), 4))
    assert x.shape == (4, 8, 8, 1) and x.min() >= 0 and x.max() <= 1 and x.std() > 0.05
    with pytest.raises(ConfigError, match="does not apply"):
        registry.get("grbm").build(config(persistent=True).model, src.info)
