"""Latent Dirichlet Allocation by online variational Bayes, as pure functions.

Hoffman, Blei & Bach 2010, "Online Learning for Latent Dirichlet Allocation", Algorithm 2: the
E-step iterates gamma and phi per document (eqs. 5-6 of the paper's Sec. 2.2, here for a whole
batch at once with dense matmuls, phi never materialised); the M-step is the natural-gradient step
lambda <- (1 - rho) lambda + rho (eta + D/|B| sstats) with rho = (tau0 + t)^-kappa. The bound
matches scikit-learn's `LatentDirichletAllocation._approx_bound`, so perplexities compare.

Shape letters: B documents in a batch, K topics, V vocabulary words.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma, gammaln


def dirichlet_expectation(a):
    """E[log x] for x ~ Dirichlet(a), along the last axis."""
    return digamma(a) - digamma(jnp.sum(a, -1, keepdims=True))


def _check(lam_KxV, counts_BxV):
    if lam_KxV.ndim != 2 or counts_BxV.ndim != 2 or lam_KxV.shape[1] != counts_BxV.shape[1]:
        raise ValueError(f"LDA wants lambda [K, V] and counts [B, V] with the same V; got "
                         f"{lam_KxV.shape} and {counts_BxV.shape}")


def e_step(lam_KxV, counts_BxV, alpha, *, gamma0_BxK=None, max_iters: int = 100, tol: float = 1e-3):
    """Per-document variational E-step -> (gamma [B, K], sstats [K, V]).

    Each document iterates gamma = alpha + exp(E log theta) * ((n / phinorm) @ exp(E log beta)^T)
    until its mean absolute change is below tol (then it stays put) or max_iters; gamma starts
    at gamma0 (default ones, as scikit-learn's transform).
    """
    _check(lam_KxV, counts_BxV)
    counts = counts_BxV.astype(jnp.float32)
    exp_beta = jnp.exp(dirichlet_expectation(lam_KxV))
    eps = jnp.finfo(jnp.float32).eps
    B, K = counts.shape[0], lam_KxV.shape[0]
    gamma0 = jnp.ones((B, K), jnp.float32) if gamma0_BxK is None else gamma0_BxK

    def update(gamma):
        exp_theta = jnp.exp(dirichlet_expectation(gamma))
        phinorm = exp_theta @ exp_beta + eps
        return alpha + exp_theta * ((counts / phinorm) @ exp_beta.T)

    def cond(carry):
        it, _, done = carry
        return (it < max_iters) & ~jnp.all(done)

    def body(carry):
        it, gamma, done = carry
        new = jnp.where(done[:, None], gamma, update(gamma))
        done = done | (jnp.mean(jnp.abs(new - gamma), -1) < tol)
        return it + 1, new, done

    _, gamma, _ = jax.lax.while_loop(cond, body, (0, gamma0, jnp.zeros((B,), bool)))
    exp_theta = jnp.exp(dirichlet_expectation(gamma))
    phinorm = exp_theta @ exp_beta + eps
    sstats = exp_beta * (exp_theta.T @ (counts / phinorm))
    return gamma, sstats


def learning_rate(step, tau0: float, kappa: float):
    """rho_t = (tau0 + t)^-kappa."""
    return (tau0 + step) ** (-kappa)


def m_step(lam_KxV, sstats_KxV, *, eta, num_docs, batch_size, rho):
    """lambda <- (1 - rho) lambda + rho (eta + D / |B| sstats)."""
    return (1.0 - rho) * lam_KxV + rho * (eta + (num_docs / batch_size) * sstats_KxV)


def doc_bound(lam_KxV, counts_BxV, gamma_BxK, alpha):
    """Per-document part of the variational bound: E[log p(w|theta,beta)] + E[log p(theta) - log q(theta)]: [B]."""
    _check(lam_KxV, counts_BxV)
    e_theta, e_beta = dirichlet_expectation(gamma_BxK), dirichlet_expectation(lam_KxV)
    # logsumexp_k(E log theta_dk + E log beta_kw), via a max-shifted matmul
    m_t, m_b = jnp.max(e_theta, -1, keepdims=True), jnp.max(e_beta, 0, keepdims=True)
    log_norm = jnp.log(jnp.exp(e_theta - m_t) @ jnp.exp(e_beta - m_b)) + m_t + m_b
    words = jnp.sum(counts_BxV * log_norm, -1)
    K = gamma_BxK.shape[-1]
    theta = (jnp.sum((alpha - gamma_BxK) * e_theta + gammaln(gamma_BxK) - gammaln(alpha), -1)
             + gammaln(alpha * K) - gammaln(jnp.sum(gamma_BxK, -1)))
    return words + theta


def topic_bound(lam_KxV, eta):
    """Corpus part of the bound: E[log p(beta|eta) - log q(beta|lambda)] (a scalar)."""
    e_beta = dirichlet_expectation(lam_KxV)
    V = lam_KxV.shape[-1]
    return (jnp.sum((eta - lam_KxV) * e_beta + gammaln(lam_KxV) - gammaln(eta))
            + jnp.sum(gammaln(eta * V) - gammaln(jnp.sum(lam_KxV, -1))))


def perplexity(lam_KxV, counts_BxV, alpha, eta, **e_step_kw):
    """exp(-bound / words) over these documents, as scikit-learn's `perplexity` computes it."""
    gamma, _ = e_step(lam_KxV, counts_BxV, alpha, **e_step_kw)
    bound = jnp.sum(doc_bound(lam_KxV, counts_BxV, gamma, alpha)) + topic_bound(lam_KxV, eta)
    return jnp.exp(-bound / jnp.sum(counts_BxV))
