"""zoo.ops.losses against NumPy formulas, closed forms and Monte Carlo."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.jaxprs import primitive_names
from zoo.ops import losses


def _np_log_sigmoid(l):
    return -np.logaddexp(0.0, -l)


def test_bernoulli_log_prob_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 4, 1)).astype(np.float32) * 3
    x = (rng.random((3, 4, 4, 1)) > 0.5).astype(np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    ref = np.sum(x * np.log(p) + (1 - x) * np.log1p(-p), axis=(1, 2, 3))
    got = losses.bernoulli_log_prob(jnp.asarray(logits), jnp.asarray(x))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_bernoulli_log_prob_is_stable_for_large_logits():
    logits = jnp.array([[1000.0, -1000.0, 1000.0, -1000.0, 80.0, -80.0]])
    x = jnp.array([[1.0, 0.0, 0.0, 1.0, 1.0, 0.0]])
    got = losses.bernoulli_log_prob(logits, x)
    l = np.asarray(logits, np.float64)[0]
    xn = np.asarray(x, np.float64)[0]
    ref = np.sum(xn * _np_log_sigmoid(l) + (1 - xn) * _np_log_sigmoid(-l))  # = -2000 + tiny
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, [ref], rtol=1e-6)
    grad = jax.grad(lambda l: losses.bernoulli_log_prob(l, x).sum())(logits)
    assert np.isfinite(grad).all()


def test_gaussian_log_prob_matches_numpy_and_broadcasts_scale():
    rng = np.random.default_rng(1)
    x, mean = rng.normal(size=(2, 5, 3, 3, 1)).astype(np.float32)
    log_scale = rng.normal(size=(3, 3, 1)).astype(np.float32) * 0.5  # per-pixel, shared over B
    s = np.exp(log_scale)
    ref = np.sum(-0.5 * ((x - mean) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi), axis=(1, 2, 3))
    got = losses.gaussian_log_prob(jnp.asarray(x), jnp.asarray(mean), jnp.asarray(log_scale))
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_diag_gaussian_and_standard_normal_log_prob():
    rng = np.random.default_rng(2)
    z, mean, log_var = rng.normal(size=(3, 4, 6)).astype(np.float32)
    ref = np.sum(-0.5 * (z - mean) ** 2 / np.exp(log_var) - 0.5 * log_var - 0.5 * np.log(2 * np.pi), -1)
    np.testing.assert_allclose(losses.diag_gaussian_log_prob(z, mean, log_var), ref, rtol=1e-5)
    ref0 = np.sum(-0.5 * z**2 - 0.5 * np.log(2 * np.pi), -1)
    np.testing.assert_allclose(losses.standard_normal_log_prob(jnp.asarray(z)), ref0, rtol=1e-6)
    zeros = jnp.zeros_like(z)
    np.testing.assert_allclose(losses.diag_gaussian_log_prob(z, zeros, zeros), ref0, rtol=1e-6)


def test_gaussian_kl_standard_closed_form():
    rng = np.random.default_rng(3)
    mean, log_var = rng.normal(size=(2, 4, 5)).astype(np.float64)
    var = np.exp(log_var)
    # KL(N(m, v) || N(0, 1)) = 0.5 * (v + m^2 - 1 - ln v), per dim
    ref = np.sum(0.5 * (var + mean**2 - 1 - log_var), -1)
    got = losses.gaussian_kl_standard(jnp.asarray(mean, jnp.float32), jnp.asarray(log_var, jnp.float32))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(losses.gaussian_kl_standard(jnp.zeros((2, 3)), jnp.zeros((2, 3))), 0.0, atol=0)


def test_gaussian_kl_standard_matches_monte_carlo():
    mean = jnp.array([[0.5, -1.0, 0.0], [2.0, 0.3, -0.2]])
    log_var = jnp.array([[0.0, -1.0, 0.7], [-0.5, 0.2, -2.0]])
    n = 50_000
    eps = jax.random.normal(jax.random.key(0), (n, *mean.shape))
    z = mean + jnp.exp(0.5 * log_var) * eps
    log_q = jax.vmap(losses.diag_gaussian_log_prob, in_axes=(0, None, None))(z, mean, log_var)
    log_p = jax.vmap(losses.standard_normal_log_prob)(z)
    mc = jnp.mean(log_q - log_p, axis=0)
    kl = losses.gaussian_kl_standard(mean, log_var)
    np.testing.assert_allclose(mc, kl, atol=0.05)


def test_cross_entropy_matches_numpy_and_is_stable():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(6, 10)).astype(np.float32) * 4
    labels = rng.integers(0, 10, size=6).astype(np.int32)
    lse = np.log(np.sum(np.exp(logits.astype(np.float64)), -1))
    ref = lse - logits[np.arange(6), labels]
    np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), ref, rtol=1e-5)
    big = jnp.array([[1000.0, 0.0, -1000.0]])
    np.testing.assert_allclose(losses.cross_entropy(big, jnp.array([1])), [1000.0], rtol=1e-6)
    np.testing.assert_allclose(losses.cross_entropy(big, jnp.array([0])), [0.0], atol=1e-6)


@pytest.mark.parametrize("fn", [losses.bernoulli_log_prob, losses.standard_normal_log_prob])
def test_outputs_are_per_example(fn):
    args = (jnp.zeros((7, 2, 3, 4)),) * (2 if fn is losses.bernoulli_log_prob else 1)
    out = fn(*args)
    assert out.shape == (7,)
    if fn is losses.bernoulli_log_prob:
        np.testing.assert_allclose(out, -24 * math.log(2.0), rtol=1e-6)


def _np_xent(logits, labels):
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]
    return lse - np.take_along_axis(x, labels[..., None], -1)[..., 0], np.exp(x - lse[..., None])


def test_cross_entropy_gradients_against_numpy_any_leading_shape():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 5, 11)) * 4).astype(np.float32)
    logits[0, 0, 3] = 300.0  # a large logit: stable
    labels = rng.integers(0, 11, (3, 5))
    g = rng.standard_normal((3, 5)).astype(np.float32)
    nll, vjp = jax.vjp(lambda x: losses.cross_entropy(x, jnp.asarray(labels)), jnp.asarray(logits))
    ref, p = _np_xent(logits, labels)
    np.testing.assert_allclose(nll, ref, rtol=1e-5, atol=1e-5)
    (grad,) = vjp(jnp.asarray(g))
    onehot = np.eye(11)[labels]
    np.testing.assert_allclose(grad, (p - onehot) * g[..., None], rtol=1e-5, atol=1e-6)


def test_cross_entropy_bf16_logits_and_no_scatter():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((4, 9)), jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 9, 4))
    loss = lambda x: losses.cross_entropy(x, labels).sum()
    grad = jax.grad(loss)(logits)
    assert losses.cross_entropy(logits, labels).dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    ref, p = _np_xent(np.asarray(logits.astype(jnp.float32)), np.asarray(labels))
    np.testing.assert_allclose(np.asarray(grad, np.float32), p - np.eye(9)[np.asarray(labels)], atol=1e-2)
    # the point of the closed-form derivative: no scatter (autodiff of the gather makes one)
    assert not any("scatter" in p for p in primitive_names(jax.grad(loss), logits))
    autodiff = lambda x: optax_like(x, labels).sum()  # noqa: E731  the gather's own transpose
    assert any("scatter" in p for p in primitive_names(jax.grad(autodiff), logits))


def optax_like(logits, labels):
    x = logits.astype(jnp.float32)
    return jax.nn.logsumexp(x, -1) - jnp.take_along_axis(x, labels[:, None], -1)[:, 0]


def test_cross_entropy_forward_mode_matches_finite_differences():
    """The closed-form derivative also serves jax.jvp (a custom_vjp would refuse forward mode)."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((4, 7))
    labels = jnp.asarray(rng.integers(0, 7, 4))
    dl = rng.standard_normal((4, 7))
    _, tangent = jax.jvp(lambda x: losses.cross_entropy(x, labels), (jnp.asarray(logits, jnp.float32),),
                         (jnp.asarray(dl, jnp.float32),))
    eps = 1e-3
    f = lambda x: _np_xent(x, np.asarray(labels))[0]  # noqa: E731
    np.testing.assert_allclose(tangent, (f(logits + eps * dl) - f(logits - eps * dl)) / (2 * eps), rtol=1e-4,
                               atol=1e-5)


def test_cross_entropy_bad_shapes():
    with pytest.raises(ValueError, match="same leading shape"):
        losses.cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((2,), jnp.int32))


def test_cross_entropy_large_vocabulary_and_far_logits():
    """A language model's vocabulary: values and gradients equal NumPy's, including a row whose
    max sits 500 above the rest (exp of the unshifted logits would overflow), and rows with
    -inf / +inf / NaN logits give what the definition gives (nan, inf, nan)."""
    C = 16384
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((3, 4, C)) * 3).astype(np.float32)
    labels = rng.integers(0, C, (3, 4))
    logits[0, 1, C // 2] = 500.0
    loss = lambda x: losses.cross_entropy(x, jnp.asarray(labels))  # noqa: E731
    ref, p = _np_xent(logits, labels)
    np.testing.assert_allclose(jax.jit(loss)(jnp.asarray(logits)), ref, rtol=1e-5, atol=1e-5)
    g = rng.standard_normal((3, 4)).astype(np.float32)
    (grad,) = jax.vjp(loss, jnp.asarray(logits))[1](jnp.asarray(g))
    np.testing.assert_allclose(grad, (p - np.eye(C)[labels]) * g[..., None], rtol=1e-4, atol=1e-6)
    edge = logits[:1, :3].copy()
    lab = np.array([[0, 1, 2]])
    edge[0, 0, :] = -np.inf        # no class at all: -inf - -inf
    edge[0, 1, 3] = np.inf         # a +inf logit, not the label's: infinite loss
    edge[0, 2, 5] = np.nan         # NaN propagates
    got = np.asarray(losses.cross_entropy(jnp.asarray(edge), jnp.asarray(lab)))
    assert np.isnan(got[0, 0]) and got[0, 1] == np.inf and np.isnan(got[0, 2])
