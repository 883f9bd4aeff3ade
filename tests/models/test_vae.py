"""VAE / AE: loss against a NumPy recomputation, IWAE evaluation, training, config errors, pmap
invariance of per-example noise."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zoo.models  # noqa: F401  (registers the models)
from zoo import registry
from zoo.errors import ConfigError, DataError
from zoo.models.vae import LOG_SCALE_MIN, make_ae, make_vae
from zoo.ops.random import example_normal

SHAPE = (8, 8, 1)
SMALL = dict(data_shape=SHAPE, latent_dim=3, hidden=(16, 8))
INFO = {"kind": "image", "shape": SHAPE, "dtype": "float32", "num_classes": 10, "name": "digits_binary"}


def _batch(b=8, binary=True, seed=0, start=0):
    x = np.random.default_rng(seed).random((b, *SHAPE)).astype(np.float32)
    if binary:
        x = (x > 0.5).astype(np.float32)
    return {"x": jnp.asarray(x), "label": jnp.zeros(b, jnp.int32),
            "idx": jnp.arange(start, start + b, dtype=jnp.int32)}


@pytest.fixture(scope="module")
def params():
    """Params of make_vae(**SMALL), shared: they do not depend on batch size or likelihood (but for
    the gaussian decoder's log_scale, added where needed)."""
    return make_vae(**SMALL).init(jax.random.key(0), _batch(2))


# ---- NumPy reference forward pass ----

def _gelu(x):  # flax nn.gelu default: tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _np_mlp(p, x):
    n = len(p)
    for i in range(n):
        x = x @ np.asarray(p[f"dense_{i}"]["kernel"], np.float64) + np.asarray(p[f"dense_{i}"]["bias"], np.float64)
        if i < n - 1:
            x = _gelu(x)
    return x


def _np_neg_elbo(params, x, eps, likelihood):
    x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    h = _np_mlp(params["encoder"], x)
    mean, log_var = np.split(h, 2, axis=-1)
    z = mean + np.exp(0.5 * log_var) * np.asarray(eps, np.float64)
    out = _np_mlp(params["decoder"]["mlp"], z)
    if likelihood == "bernoulli":
        p = 1 / (1 + np.exp(-out))
        log_lik = np.sum(x * np.log(p) + (1 - x) * np.log(1 - p), -1)
    else:
        log_s = np.maximum(np.asarray(params["decoder"]["log_scale"], np.float64).reshape(-1), LOG_SCALE_MIN)
        log_lik = np.sum(-0.5 * ((x - out) / np.exp(log_s)) ** 2 - log_s - 0.5 * np.log(2 * np.pi), -1)
    kl = np.sum(0.5 * (np.exp(log_var) + mean**2 - 1 - log_var), -1)
    return np.mean(-log_lik + kl), np.mean(-log_lik), np.mean(kl)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_loss_matches_numpy_negative_elbo(likelihood, params):
    model = make_vae(**SMALL, likelihood=likelihood)
    batch = _batch(binary=likelihood == "bernoulli")
    if likelihood == "gaussian":  # exercise the clip: half the pixels below log(1/256)
        raw = jnp.where(jnp.arange(64).reshape(SHAPE) % 2 == 0, -20.0, 0.3)
        params = {**params, "decoder": {**params["decoder"], "log_scale": raw}}
        assert jax.tree.structure(params) == jax.tree.structure(
            jax.eval_shape(model.init, jax.random.key(0), batch))
    key = jax.random.key(1)
    loss, metrics = jax.jit(model.loss)(params, key, batch)
    eps = example_normal(key, batch["idx"], (SMALL["latent_dim"],))
    ref, ref_recon, ref_kl = _np_neg_elbo(params, batch["x"], eps, likelihood)
    np.testing.assert_allclose(loss, ref, rtol=1e-4)
    np.testing.assert_allclose(metrics["nll_recon"], ref_recon, rtol=1e-4)
    np.testing.assert_allclose(metrics["kl"], ref_kl, rtol=1e-4, atol=1e-5)
    assert set(metrics) == {"loss", "nll_recon", "kl"}


def test_loss_is_split_invariant(params):
    """Full batch == mean of halves when idx stays global: what makes pmap agree with jit."""
    model = make_vae(**SMALL, eval_k=8, eval_chunk=3)  # 3 chunks, the last one padded
    batch = _batch(8)
    key = jax.random.key(5)
    loss = jax.jit(model.loss)
    halves = [jax.tree.map(lambda a: a[s], batch) for s in (slice(0, 4), slice(4, 8))]
    full, _ = loss(params, key, batch)
    np.testing.assert_allclose(full, np.mean([loss(params, key, h)[0] for h in halves]), rtol=1e-6)
    ev_full = jax.jit(model.evaluate)(params, key, batch)
    # one chunk for the halves: sample k is fold_in(example key, k), so chunking changes nothing either
    evaluate_one_chunk = jax.jit(make_vae(**SMALL, eval_k=8, eval_chunk=8).evaluate)
    ev_halves = [evaluate_one_chunk(params, key, h) for h in halves]
    for name in ev_full:
        np.testing.assert_allclose(ev_full[name], np.concatenate([h[name] for h in ev_halves]), rtol=1e-5)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (tests/conftest.py fakes 8 on CPU)")
def test_pmap_loss_matches_jit(params):
    model = make_vae(**SMALL)
    batch = _batch(8)
    key = jax.random.key(3)
    full, _ = jax.jit(model.loss)(params, key, batch)
    sharded = jax.tree.map(lambda a: a.reshape(2, 4, *a.shape[1:]), batch)
    per_dev = jax.pmap(lambda b: model.loss(params, key, b)[0], devices=jax.devices()[:2])(sharded)
    np.testing.assert_allclose(full, np.mean(per_dev), rtol=1e-5)


def test_evaluate_iwae_tighter_than_elbo_and_improves_with_k(params):
    batch = _batch(16)
    key = jax.random.key(7)
    evaluate = lambda k, chunk=32: jax.jit(make_vae(**SMALL, eval_k=k, eval_chunk=chunk).evaluate)(params, key, batch)
    out = {k: evaluate(k) for k in (1, 10, 100)}
    for k, ev in out.items():
        assert set(ev) == {"elbo", "nll_iwae", "bits_per_dim_iwae"}
        assert ev["nll_iwae"].shape == (16,)
        assert (ev["nll_iwae"] <= -ev["elbo"] + 1e-4).all()  # per example, per draw (Jensen)
        np.testing.assert_allclose(ev["bits_per_dim_iwae"], ev["nll_iwae"] / (64 * math.log(2)), rtol=1e-5)
    np.testing.assert_allclose(out[1]["nll_iwae"], -out[1]["elbo"], rtol=1e-5)
    nll = [float(out[k]["nll_iwae"].mean()) for k in (1, 10, 100)]
    assert nll[0] > nll[1] > nll[2], nll
    assert float(out[100]["nll_iwae"].mean()) < float(-out[100]["elbo"].mean()) - 0.1


def test_evaluate_elbo_agrees_with_loss_in_expectation(params):
    """MC-KL ELBO from the importance weights vs the analytic-KL training loss (both unbiased)."""
    batch = _batch(8)
    model = make_vae(**SMALL, eval_k=1000, eval_chunk=500)
    elbo = jax.jit(model.evaluate)(params, jax.random.key(1), batch)["elbo"].mean()
    keys = jax.random.split(jax.random.key(2), 300)
    neg_elbo = jnp.mean(jax.jit(jax.vmap(lambda k: model.loss(params, k, batch)[0]))(keys))
    np.testing.assert_allclose(-elbo, neg_elbo, rtol=3e-3)


def _prototype_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    protos = (rng.random((4, *SHAPE)) > 0.5).astype(np.float32)
    x = protos[rng.integers(0, 4, n)]
    flips = rng.random(x.shape) < 0.03
    return {"x": jnp.asarray(np.where(flips, 1 - x, x)), "label": jnp.zeros(n, jnp.int32),
            "idx": jnp.arange(n, dtype=jnp.int32)}


def _train(model, params, batch, steps=300, lr=1e-2):
    opt = optax.adam(lr)

    def step(carry, key):
        params, opt_state = carry
        (loss, _), grads = jax.value_and_grad(model.loss, has_aux=True)(params, key, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    keys = jax.random.split(jax.random.key(1), steps)
    (params, _), losses = jax.jit(lambda c, k: jax.lax.scan(step, c, k))((params, opt.init(params)), keys)
    return params, np.asarray(losses)


def test_vae_training_lowers_loss(params):
    batch = _prototype_data()
    _, losses = _train(make_vae(**SMALL), params, batch)
    first, last = losses[:10].mean(), losses[-20:].mean()
    assert np.isfinite(losses).all()
    assert last < 0.5 * first, (first, last)


def test_ae_training_lowers_loss():
    batch = _prototype_data()
    model = make_ae(**SMALL)
    params, losses = _train(model, model.init(jax.random.key(0), batch), batch)
    assert losses[-20:].mean() < 0.5 * losses[:10].mean()
    ev = model.evaluate(params, jax.random.key(0), batch)
    assert set(ev) == {"recon"} and ev["recon"].shape == (64,)


@pytest.mark.parametrize("make,likelihood", [(make_vae, "bernoulli"), (make_vae, "gaussian"), (make_ae, "gaussian")])
def test_sample_shape_and_range(make, likelihood):
    model = make(**SMALL, likelihood=likelihood)
    params = model.init(jax.random.key(0), _batch(2))
    s = model.sample(params, jax.random.key(1), 5)
    assert s.shape == (5, *SHAPE)
    assert (s >= 0).all() and (s <= 1).all()


def test_config_errors():
    with pytest.raises(ConfigError, match="bernoulli, gaussian"):
        make_vae(data_shape=SHAPE, likelihood="poisson")
    with pytest.raises(ConfigError, match="bernoulli, gaussian"):
        make_ae(data_shape=SHAPE, likelihood="laplace")
    with pytest.raises(ConfigError, match="latent_dim"):
        make_vae(data_shape=SHAPE, latent_dim=0)
    with pytest.raises(ConfigError, match="eval_k"):
        make_vae(data_shape=SHAPE, eval_k=0)
    entry = registry.get("vae")
    cfg = entry.config()
    cfg.model.unlisted = 3
    with pytest.raises(ConfigError, match="latent_dim"):
        entry.build(cfg.model, INFO)
    model = make_vae(**SMALL)
    with pytest.raises(DataError, match="8, 8, 1"):
        model.init(jax.random.key(0), {"x": jnp.zeros((2, 4, 4, 1)), "idx": jnp.arange(2)})


@pytest.mark.parametrize("name", ["vae", "ae"])
def test_registry_defaults_build(name):
    entry = registry.get(name)
    cfg = entry.config()
    assert cfg.data.name == "digits_binary" and cfg.batch_size == 128 and cfg.steps == 5000
    assert cfg.optimizer.lr == 1e-3 and cfg.ema_decay == 0.0
    assert tuple(cfg.model.hidden) == (512, 256)
    model = entry.build(cfg.model, INFO)
    params = jax.eval_shape(model.init, jax.random.key(0), _batch(2))
    loss = jax.eval_shape(model.loss, params, jax.random.key(0), _batch(2))[0]
    assert loss.shape == ()
