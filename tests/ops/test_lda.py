"""LDA ops against a NumPy transcription of Hoffman et al.'s updates and scikit-learn's bound."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import psi

from zoo.ops import lda


def np_dirichlet_expectation(a):
    return psi(a) - psi(a.sum(-1, keepdims=True))


def np_e_step(lam, counts, alpha, gamma0=None, max_iters=100, tol=1e-3):
    """One document at a time, as Hoffman's onlineldavb.py / scikit-learn's _update_doc_distribution."""
    exp_beta = np.exp(np_dirichlet_expectation(lam))
    eps = np.finfo(np.float32).eps
    gammas, sstats = [], np.zeros_like(lam)
    for d, n in enumerate(counts):
        g = np.ones(lam.shape[0]) if gamma0 is None else gamma0[d]
        et = np.exp(np_dirichlet_expectation(g))
        for _ in range(max_iters):
            last = g
            phinorm = et @ exp_beta + eps
            g = alpha + et * ((n / phinorm) @ exp_beta.T)
            et = np.exp(np_dirichlet_expectation(g))
            if np.mean(np.abs(g - last)) < tol:
                break
        gammas.append(g)
        sstats += np.outer(et, n / (et @ exp_beta + eps))
    return np.array(gammas), sstats * exp_beta


@pytest.fixture
def tiny():
    r = np.random.default_rng(0)
    lam = r.gamma(100, 0.01, (4, 12)) + r.random((4, 12)) * 3
    counts = r.poisson(1.0, (37, 12)).astype(np.float64)
    return lam, counts


def test_dirichlet_expectation():
    a = np.random.default_rng(0).gamma(2.0, 1.0, (3, 5)) + 0.01
    np.testing.assert_allclose(np.asarray(lda.dirichlet_expectation(jnp.asarray(a))),
                               np_dirichlet_expectation(a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("min_rows,shrink", [(16, 4), (4, 3), (37, 1)])  # compaction must not change results
def test_e_step_matches_numpy(tiny, min_rows, shrink):
    lam, counts = tiny
    gamma0 = np.random.default_rng(1).gamma(100, 0.01, (len(counts), 4))
    for g0 in (None, gamma0):
        g_ref, s_ref = np_e_step(lam, counts, 0.25, g0)
        g, s = lda.e_step(jnp.asarray(lam, jnp.float32), jnp.asarray(counts, jnp.float32), 0.25,
                          gamma0_BxK=None if g0 is None else jnp.asarray(g0, jnp.float32),
                          min_rows=min_rows, shrink=shrink)
        np.testing.assert_allclose(np.asarray(g), g_ref, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(np.asarray(s), s_ref, rtol=2e-3, atol=2e-4)


def test_e_step_respects_max_iters(tiny):
    lam, counts = tiny
    g_ref, _ = np_e_step(lam, counts, 0.25, max_iters=3, tol=0.0)
    g, _ = lda.e_step(jnp.asarray(lam, jnp.float32), jnp.asarray(counts, jnp.float32), 0.25,
                      max_iters=3, tol=0.0)
    np.testing.assert_allclose(np.asarray(g), g_ref, rtol=1e-4, atol=1e-4)


def test_m_step_formula(tiny):
    lam, _ = tiny
    s = np.random.default_rng(1).random(lam.shape)
    out = lda.m_step(jnp.asarray(lam), jnp.asarray(s), eta=0.1, num_docs=1000, batch_size=50, rho=0.3)
    np.testing.assert_allclose(np.asarray(out), 0.7 * lam + 0.3 * (0.1 + 20 * s), rtol=1e-5)
    assert float(lda.learning_rate(1.0, 10.0, 0.7)) == pytest.approx(11 ** -0.7)


@pytest.fixture(scope="module")
def fitted():
    from sklearn.decomposition import LatentDirichletAllocation

    r = np.random.default_rng(0)
    X = r.poisson(0.7, (80, 30)).astype(np.float32)
    X[X.sum(1) == 0, 0] = 1
    sk = LatentDirichletAllocation(n_components=5, learning_method="online", max_iter=3,
                                   random_state=0).fit(X[:60])
    return sk, X[60:]


def test_bound_matches_sklearn_on_the_same_gamma(fitted):
    sk, X = fitted
    gamma = sk._unnormalized_transform(X)  # scikit-learn's own E-step
    ours = lda.approx_bound(jnp.asarray(sk.components_), jnp.asarray(X), jnp.asarray(gamma),
                            sk.doc_topic_prior_, sk.topic_word_prior_)
    np.testing.assert_allclose(float(ours), sk._approx_bound(X, gamma, sub_sampling=False), rtol=1e-5)
    p = lda.perplexity(jnp.asarray(sk.components_), jnp.asarray(X), sk.doc_topic_prior_,
                       sk.topic_word_prior_, gamma_BxK=jnp.asarray(gamma))
    np.testing.assert_allclose(float(p), sk._perplexity_precomp_distr(X, gamma), rtol=1e-4)


def test_perplexity_matches_sklearn(fitted):
    sk, X = fitted  # our E-step (from ones, same iterations/tolerance) and bound vs sklearn's perplexity
    ours = lda.perplexity(jnp.asarray(sk.components_, jnp.float32), jnp.asarray(X),
                          sk.doc_topic_prior_, sk.topic_word_prior_)
    np.testing.assert_allclose(float(ours), sk.perplexity(X), rtol=2e-3)


def test_bad_shapes():
    with pytest.raises(ValueError, match="same V"):
        lda.e_step(jnp.ones((3, 5)), jnp.ones((2, 6)), 0.1)
    with pytest.raises(ValueError, match="same V"):
        lda.doc_bound(jnp.ones((3, 5)), jnp.ones((5,)), jnp.ones((1, 3)), 0.1)
    with pytest.raises(ValueError, match="gamma"):
        lda.e_step(jnp.ones((3, 5)), jnp.ones((2, 5)), 0.1, gamma0_BxK=jnp.ones((2, 4)))
