"""IWAE bound (Burda et al. 2016) on a linear-Gaussian model whose log p(x) is known exactly.

z ~ N(0, 1), x | z ~ N(z, s^2)  =>  p(x) = N(0, 1 + s^2), p(z | x) = N(x / (1 + s^2), s^2 / (1 + s^2)).
"""

import math

import jax.numpy as jnp
import numpy as np

from zoo.eval import bits_per_dim, elbo_from_log_w, iwae_bound, nats_to_bits

S2 = 0.5  # observation noise variance
X_B = np.array([-2.0, -0.5, 0.0, 1.0, 2.5])


def _log_normal(x, mean, var):
    return -0.5 * (x - mean) ** 2 / var - 0.5 * np.log(2 * np.pi * var)


def _log_w(rng, shape, q_mean_B, q_var_B):
    """Log importance weights [*shape, B] with z ~ q(z | x) = N(q_mean, q_var)."""
    z = q_mean_B + np.sqrt(q_var_B) * rng.standard_normal((*shape, X_B.size))
    return _log_normal(X_B, z, S2) + _log_normal(z, 0.0, 1.0) - _log_normal(z, q_mean_B, q_var_B)


LOG_PX_B = _log_normal(X_B, 0.0, 1.0 + S2)
POST_MEAN_B, POST_VAR_B = X_B / (1 + S2), np.full(X_B.size, S2 / (1 + S2))
BAD_MEAN_B, BAD_VAR_B = POST_MEAN_B + 1.0, POST_VAR_B * 1.5  # deliberately imperfect q


def test_iwae_bound_matches_numpy_logsumexp():
    log_w = np.random.default_rng(0).normal(size=(13, 4)) * 5
    ref = np.log(np.mean(np.exp(log_w - log_w.max(0)), 0)) + log_w.max(0)
    np.testing.assert_allclose(iwae_bound(jnp.asarray(log_w)), ref, rtol=1e-5)
    np.testing.assert_allclose(elbo_from_log_w(jnp.asarray(log_w)), log_w.mean(0), rtol=1e-5)


def test_iwae_at_least_elbo_and_rises_with_k_to_log_px():
    reps, ks = 500, (1, 10, 100, 1000)
    # one pool of draws, bound at k uses the first k (common random numbers: less noise in the diffs)
    log_w_RxKxB = _log_w(np.random.default_rng(1), (reps, ks[-1]), BAD_MEAN_B, BAD_VAR_B).astype(np.float32)
    means = []
    for k in ks:
        log_w_KxRB = jnp.asarray(log_w_RxKxB[:, :k].transpose(1, 0, 2).reshape(k, -1))
        iwae = np.asarray(iwae_bound(log_w_KxRB))
        elbo = np.asarray(elbo_from_log_w(log_w_KxRB))
        assert (iwae >= elbo - 1e-5).all()  # Jensen: holds for every draw, not just on average
        if k == 1:
            np.testing.assert_allclose(iwae, elbo, rtol=1e-6)
        means.append(iwae.reshape(reps, -1).mean(0))  # [B], expectation over reps
    means = np.stack(means)
    diffs = np.diff(means, axis=0)
    assert (diffs[:2] > 0.05).all(), means  # Burda et al. Theorem 1: E[L_k] rises with k
    assert (diffs[2] > -1e-3).all(), means  # near convergence the rise is below MC noise
    assert (means <= LOG_PX_B + 1e-3).all()
    assert (means[0] < LOG_PX_B - 0.5).all()  # the ELBO gap is real for this q
    np.testing.assert_allclose(means[-1], LOG_PX_B, atol=0.02)


def test_exact_posterior_gives_log_px_for_any_k():
    rng = np.random.default_rng(2)
    for k in (1, 7, 100):
        log_w = jnp.asarray(_log_w(rng, (k,), POST_MEAN_B, POST_VAR_B))
        np.testing.assert_allclose(iwae_bound(log_w), LOG_PX_B, atol=1e-5)
        np.testing.assert_allclose(elbo_from_log_w(log_w), LOG_PX_B, atol=1e-5)


def test_unit_conversions():
    np.testing.assert_allclose(nats_to_bits(jnp.array(math.log(2.0))), 1.0, rtol=1e-7)
    np.testing.assert_allclose(bits_per_dim(jnp.array([64 * math.log(2.0), 0.0]), 64), [1.0, 0.0], rtol=1e-6)
