"""LDA ops against a NumPy transcription of Hoffman et al.'s updates and scikit-learn's bound."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import psi

from zoo.ops import lda


def np_e_step(lam, counts, alpha, max_iters=100, tol=1e-3):
    """Per document, as in Hoffman's onlineldavb.py / scikit-learn's _update_doc_distribution."""
    dexp = lambda a: psi(a) - psi(a.sum(-1, keepdims=True))
    exp_beta = np.exp(dexp(lam))
    eps = np.finfo(np.float32).eps
    gammas, sstats = [], np.zeros_like(lam)
    for n in counts:
        g = np.ones(lam.shape[0])
        et = np.exp(dexp(g))
        for _ in range(max_iters):
            last = g
            phinorm = et @ exp_beta + eps
            g = alpha + et * ((n / phinorm) @ exp_beta.T)
            et = np.exp(dexp(g))
            if np.mean(np.abs(g - last)) < tol:
                break
        gammas.append(g)
        sstats += np.outer(et, n / (et @ exp_beta + eps))
    return np.array(gammas), sstats * exp_beta


@pytest.fixture
def tiny():
    r = np.random.default_rng(0)
    lam = r.gamma(100, 0.01, (4, 12)) + r.random((4, 12)) * 3
    counts = r.poisson(1.0, (6, 12)).astype(np.float64)
    return lam, counts


def test_e_step_matches_numpy(tiny):
    lam, counts = tiny
    g_ref, s_ref = np_e_step(lam, counts, 0.25)
    g, s = lda.e_step(jnp.asarray(lam, jnp.float32), jnp.asarray(counts, jnp.float32), 0.25)
    np.testing.assert_allclose(np.asarray(g), g_ref, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(np.asarray(s), s_ref, rtol=2e-3, atol=2e-4)


def test_m_step_formula(tiny):
    lam, _ = tiny
    s = np.random.default_rng(1).random(lam.shape)
    out = lda.m_step(jnp.asarray(lam), jnp.asarray(s), eta=0.1, num_docs=1000, batch_size=50, rho=0.3)
    np.testing.assert_allclose(np.asarray(out), 0.7 * lam + 0.3 * (0.1 + 20 * s), rtol=1e-5)
    assert float(lda.learning_rate(1.0, 10.0, 0.7)) == pytest.approx(11 ** -0.7)


def test_perplexity_matches_sklearn():
    from sklearn.decomposition import LatentDirichletAllocation

    r = np.random.default_rng(0)
    X = r.poisson(0.7, (80, 30)).astype(np.float64)
    X[X.sum(1) == 0, 0] = 1
    sk = LatentDirichletAllocation(n_components=5, learning_method="online", max_iter=3, random_state=0).fit(X[:60])
    ours = lda.perplexity(jnp.asarray(sk.components_, jnp.float32), jnp.asarray(X[60:], jnp.float32),
                          sk.doc_topic_prior_, sk.topic_word_prior_)
    np.testing.assert_allclose(float(ours), sk.perplexity(X[60:]), rtol=2e-3)


def test_bad_shapes():
    with pytest.raises(ValueError, match="same V"):
        lda.e_step(jnp.ones((3, 5)), jnp.ones((2, 6)), 0.1)
