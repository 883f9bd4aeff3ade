"""Latent Dirichlet Allocation by online variational Bayes, as pure functions.

Hoffman, Blei & Bach 2010, "Online Learning for Latent Dirichlet Allocation", Algorithm 2 with the
mini-batch update of its Sec. 2.3 (the paper's equation numbers are not reproduced here: the
lines below are named after Algorithm 2's steps):
- E-step (`e_step`): per document, "set phi_dwk ∝ exp(E[log theta_dk] + E[log beta_kw])" and
  "set gamma_dk = alpha + sum_w phi_dwk n_dw", repeated until gamma settles; for the whole batch
  at once with dense matmuls. phi is never materialised: with phinorm_dw = sum_k exp(E log
  theta_dk) exp(E log beta_kw), gamma = alpha + exp(E log theta) * ((n / phinorm) @ exp(E log beta)^T).
- M-step (`m_step`): "compute lambda_tilde_kw = eta + D n_dw phi_dwk" (averaged over the
  mini-batch: eta + D/|B| sum_d n_dw phi_dwk) and "set lambda = (1 - rho_t) lambda + rho_t
  lambda_tilde", with rho_t = (tau0 + t)^-kappa (`learning_rate`).
- The bound (`approx_bound`, `perplexity`): the variational lower bound on log p(w) evaluated as
  scikit-learn's `LatentDirichletAllocation._approx_bound` (sub_sampling=False) computes it, so
  the two perplexities are the same number for the same lambda and gamma.

Speed: a document that has converged stops changing (a per-document mask, as scikit-learn's
per-document loop). The batch is also compacted as documents converge: once at most half of the
active rows are still moving, those rows are gathered into a batch half the size, so the matmuls
shrink with the number of unconverged documents instead of running the whole batch to the slowest.

Shape letters: B documents in a batch, S active (unconverged) rows, K topics, V vocabulary words.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma, gammaln


def dirichlet_expectation(alpha):
    """E[log x] for x ~ Dirichlet(alpha), along the last axis."""
    return digamma(alpha) - digamma(jnp.sum(alpha, -1, keepdims=True))


def _check(lam_KxV, counts_BxV, gamma_BxK=None):
    if lam_KxV.ndim != 2 or counts_BxV.ndim != 2 or lam_KxV.shape[1] != counts_BxV.shape[1]:
        raise ValueError(f"LDA wants lambda [K, V] and counts [B, V] with the same V; got "
                         f"{tuple(lam_KxV.shape)} and {tuple(counts_BxV.shape)}")
    want = (counts_BxV.shape[0], lam_KxV.shape[0])
    if gamma_BxK is not None and tuple(gamma_BxK.shape) != want:
        raise ValueError(f"gamma must be [B, K] = {want}; got {tuple(gamma_BxK.shape)}")


def _level_sizes(b: int, min_rows: int, shrink: int) -> list[int]:
    """Active-row counts of the compaction levels: b, ceil(b/shrink), ... down to min_rows."""
    sizes = [b]
    while sizes[-1] > max(min_rows, 1) and shrink > 1:
        sizes.append(math.ceil(sizes[-1] / shrink))
    return sizes


def e_step(lam_KxV, counts_BxV, alpha, *, gamma0_BxK=None, max_iters: int = 100,
           tol: float = 1e-3, min_rows: int = 16, shrink: int = 4):
    """Variational E-step for a batch -> (gamma [B, K], sstats [K, V]).

    Each document iterates until the mean absolute change of its gamma is below `tol` (then it
    stays put), or `max_iters` iterations: scikit-learn's `max_doc_update_iter` and
    `mean_change_tol`. gamma starts at `gamma0` (default ones, as scikit-learn's `transform`).
    sstats_kw = exp(E log beta_kw) sum_d exp(E log theta_dk) n_dw / phinorm_dw: sum_d n_dw phi_dwk.
    `min_rows` (static) is the smallest compacted batch; it changes speed, not results.
    """
    _check(lam_KxV, counts_BxV, gamma0_BxK)
    dtype = jnp.result_type(lam_KxV.dtype, jnp.float32)
    counts = counts_BxV.astype(dtype)
    exp_beta_KxV = jnp.exp(dirichlet_expectation(lam_KxV.astype(dtype)))
    eps = jnp.finfo(dtype).eps  # scikit-learn's `np.finfo(X.dtype).eps` guard on phinorm
    B, K = counts.shape[0], lam_KxV.shape[0]
    gamma = jnp.ones((B, K), dtype) if gamma0_BxK is None else gamma0_BxK.astype(dtype)

    def update(gamma_SxK, counts_SxV):
        exp_theta_SxK = jnp.exp(dirichlet_expectation(gamma_SxK))
        phinorm_SxV = exp_theta_SxK @ exp_beta_KxV + eps
        return alpha + exp_theta_SxK * ((counts_SxV / phinorm_SxV) @ exp_beta_KxV.T)

    def run_level(it, gamma_SxK, done_S, counts_SxV, stop_at):
        """Iterate the active rows until at most `stop_at` of them are still moving."""
        def cond(carry):
            it, _, done = carry
            return (it < max_iters) & (jnp.sum(~done) > stop_at)

        def body(carry):
            it, g, done = carry
            new = jnp.where(done[:, None], g, update(g, counts_SxV))
            return it + 1, new, done | (jnp.mean(jnp.abs(new - g), -1) < tol)

        return jax.lax.while_loop(cond, body, (it, gamma_SxK, done_S))

    sizes = _level_sizes(B, min_rows, shrink)
    rows_S = jnp.arange(B)  # which documents the active rows are
    it, gamma_S, done_S = jnp.int32(0), gamma, jnp.zeros((B,), bool)
    for level, size in enumerate(sizes):
        last = level == len(sizes) - 1
        it, gamma_S, done_S = run_level(it, gamma_S, done_S, counts[rows_S], 0 if last else sizes[level + 1])
        gamma = gamma.at[rows_S].set(gamma_S)
        if not last:  # keep the unconverged rows (stable sort: False first), halve the batch
            keep = jnp.argsort(done_S, stable=True)[: sizes[level + 1]]
            rows_S, gamma_S, done_S = rows_S[keep], gamma_S[keep], done_S[keep]

    exp_theta_BxK = jnp.exp(dirichlet_expectation(gamma))
    phinorm_BxV = exp_theta_BxK @ exp_beta_KxV + eps
    sstats_KxV = exp_beta_KxV * (exp_theta_BxK.T @ (counts / phinorm_BxV))
    return gamma, sstats_KxV


def learning_rate(step, tau0: float, kappa: float):
    """rho_t = (tau0 + t)^-kappa (Algorithm 2); scikit-learn counts t from 1."""
    return (tau0 + step) ** (-kappa)


def m_step(lam_KxV, sstats_KxV, *, eta, num_docs, batch_size, rho):
    """lambda <- (1 - rho) lambda + rho (eta + D / |B| sstats): Algorithm 2's M-step."""
    return (1.0 - rho) * lam_KxV + rho * (eta + (num_docs / batch_size) * sstats_KxV)


def _dirichlet_term(prior, distr_NxM, e_log_NxM):
    """E[log p(x | prior) - log q(x | distr)] per row for symmetric Dirichlets: [N]."""
    m = distr_NxM.shape[-1]
    return (jnp.sum((prior - distr_NxM) * e_log_NxM + gammaln(distr_NxM) - gammaln(prior), -1)
            + gammaln(prior * m) - gammaln(jnp.sum(distr_NxM, -1)))


def doc_bound(lam_KxV, counts_BxV, gamma_BxK, alpha):
    """Per-document terms of the bound: E[log p(w | theta, beta)] + E[log p(theta) - log q(theta)]: [B]."""
    _check(lam_KxV, counts_BxV, gamma_BxK)
    e_theta_BxK, e_beta_KxV = dirichlet_expectation(gamma_BxK), dirichlet_expectation(lam_KxV)
    # log sum_k exp(E log theta_dk + E log beta_kw) as a max-shifted matmul (no [B, K, V] tensor)
    m_Bx1, m_1xV = jnp.max(e_theta_BxK, -1, keepdims=True), jnp.max(e_beta_KxV, 0, keepdims=True)
    log_norm_BxV = jnp.log(jnp.exp(e_theta_BxK - m_Bx1) @ jnp.exp(e_beta_KxV - m_1xV)) + m_Bx1 + m_1xV
    words_B = jnp.sum(jnp.where(counts_BxV > 0, counts_BxV * log_norm_BxV, 0.0), -1)
    return words_B + _dirichlet_term(alpha, gamma_BxK, e_theta_BxK)


def topic_bound(lam_KxV, eta):
    """Corpus term of the bound: E[log p(beta | eta) - log q(beta | lambda)] (a scalar)."""
    return jnp.sum(_dirichlet_term(eta, lam_KxV, dirichlet_expectation(lam_KxV)))


def approx_bound(lam_KxV, counts_BxV, gamma_BxK, alpha, eta):
    """The variational bound on log p(counts), as scikit-learn's `_approx_bound(X, gamma, False)`."""
    return jnp.sum(doc_bound(lam_KxV, counts_BxV, gamma_BxK, alpha)) + topic_bound(lam_KxV, eta)


def perplexity(lam_KxV, counts_BxV, alpha, eta, *, gamma_BxK=None, **e_step_kw):
    """exp(-bound / words) over these documents, as scikit-learn's `perplexity`.

    Without gamma, it comes from `e_step` started at ones (scikit-learn's `transform`).
    """
    if gamma_BxK is None:
        gamma_BxK, _ = e_step(lam_KxV, counts_BxV, alpha, **e_step_kw)
    bound = approx_bound(lam_KxV, counts_BxV, gamma_BxK, alpha, eta)
    return jnp.exp(-bound / jnp.sum(counts_BxV))
