"""Log-likelihoods, KL divergences and classification losses as pure jax.numpy functions.

Every density returns one value per example, summed over all non-batch dims, in nats, so a model
can add terms (as in the ELBO of Kingma & Welling 2014, eq. 10) and average over the batch itself.

Shape letters: B batch, Z latent dim, C classes, "..." any per-example dims (e.g. H x W x C).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from zoo.ops import _pallas
from zoo.ops import logsumexp as _lse

_LOG_2PI = math.log(2.0 * math.pi)


def _sum_per_example(x_B: jax.Array) -> jax.Array:
    """Sum over every axis but the first: [B, ...] -> [B]."""
    return jnp.sum(x_B.reshape(x_B.shape[0], -1), axis=-1)


def bernoulli_log_prob(logits: jax.Array, x: jax.Array) -> jax.Array:
    """log Bernoulli(x | sigmoid(logits)) summed per example: [B, ...] -> [B].

    Written as x * l - softplus(l), which stays finite for |logits| in the thousands; x may be any
    value in [0, 1] (a "continuous Bernoulli" without its normaliser, the usual VAE practice).
    """
    logits = logits.astype(jnp.float32)
    x = x.astype(jnp.float32)
    return _sum_per_example(x * logits - jax.nn.softplus(logits))


def gaussian_log_prob(x: jax.Array, mean: jax.Array, log_scale: jax.Array) -> jax.Array:
    """log N(x | mean, exp(log_scale)^2) summed per example (log_scale = log std): [B, ...] -> [B]."""
    log_scale = jnp.broadcast_to(log_scale, jnp.broadcast_shapes(x.shape, jnp.shape(log_scale)))
    z = (x - mean) * jnp.exp(-log_scale)
    return _sum_per_example(-0.5 * (z * z + _LOG_2PI) - log_scale)


def diag_gaussian_log_prob(x_BxZ: jax.Array, mean_BxZ: jax.Array, log_var_BxZ: jax.Array) -> jax.Array:
    """log N(x | mean, diag(exp(log_var))) summed per example (log-variance form): -> [B]."""
    return gaussian_log_prob(x_BxZ, mean_BxZ, 0.5 * log_var_BxZ)


def standard_normal_log_prob(x_BxZ: jax.Array) -> jax.Array:
    """log N(x | 0, I) summed per example: [B, ...] -> [B]."""
    return _sum_per_example(-0.5 * (x_BxZ * x_BxZ + _LOG_2PI))


def gaussian_kl_standard(mean_BxZ: jax.Array, log_var_BxZ: jax.Array) -> jax.Array:
    """KL(N(mean, diag(exp(log_var))) || N(0, I)) per example, closed form (Kingma & Welling 2014, App. B)."""
    return _sum_per_example(0.5 * (jnp.exp(log_var_BxZ) + mean_BxZ**2 - 1.0 - log_var_BxZ))


def cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array, *, logsumexp: str | None = None) -> jax.Array:
    """-log softmax(logits)[label] over the last axis: [..., C], int [...] -> float32 [...].

    Computed in float32 whatever the logits' dtype. Its derivative is given in closed form,
    d nll = sum((softmax - onehot(label)) * d logits), with the one-hot an iota comparison, so
    reverse mode gives one elementwise expression for the logits' gradient (in their dtype).
    Plain autodiff of the label gather would scatter into a [..., C] array of zeros, which XLA runs
    as a pass of its own over that gradient: for a language model's output (GPT-124M at B16:
    16,384 x 50,304 float32 logits) each pass is ~1 ms on an H200.

    `logsumexp` picks zoo.ops.logsumexp's implementation for the rows' logsumexp: "xla" (or None:
    jax.nn.logsumexp, two passes over the logits, row max then sum; one-pass XLA forms measured on
    an H200 and dropped are in benchmarks/results/README.md), "pallas" (one pass, a Triton
    kernel on a GPU; the logits go to it in their own dtype) or "auto" (pallas on an NVIDIA GPU,
    else xla)."""
    if logits_BxC.shape[:-1] != labels_B.shape:
        raise ValueError(f"cross_entropy: logits [..., C] and labels [...] need the same leading shape, "
                         f"got {logits_BxC.shape} and {labels_B.shape}")
    return _xent(logits_BxC, labels_B, _lse_impl("cross_entropy", logsumexp))


def linear_cross_entropy(h_NxH: jax.Array, w_VxH: jax.Array, labels_N: jax.Array, *, logits_dtype=None,
                         logsumexp: str | None = None) -> jax.Array:
    """cross_entropy(h @ w.T, labels) with the output layer inside: h [..., H], w [V, H], int
    labels [...] -> float32 [...]; the product runs in h's dtype (w is cast to it) with logits in
    `logits_dtype` (h's by default; float32 for float32 logits from bf16 inputs).

    The same function as the two ops apart, with a cheaper gradient: the forward keeps d =
    softmax - onehot(label) (zoo.ops.logsumexp.cross_entropy_and_grad, in h's dtype) in place of
    the logits, so the backward is two matmuls on d and never reads the logits; the loss's
    cotangent g scales rows of the [..., H] arrays, not of d: dh = g * (d @ w) and
    dw = d.T @ (g * h). With logsumexp="pallas" the forward's one kernel reads the logits and
    writes d; split apart, the logits are read for the logsumexp and again, with the gradient
    written, in the backward (GPT-124M at B64: 6.6 GB each way in bf16)."""
    h_NxH, w_VxH, labels_N = jnp.asarray(h_NxH), jnp.asarray(w_VxH), jnp.asarray(labels_N)
    if w_VxH.ndim != 2 or h_NxH.ndim < 1 or h_NxH.shape[-1] != w_VxH.shape[1] or h_NxH.shape[:-1] != labels_N.shape:
        raise ValueError(f"linear_cross_entropy: want h [..., H], w [V, H] and labels [...] with h's leading "
                         f"shape, got {h_NxH.shape}, {w_VxH.shape} and {labels_N.shape}")
    logsumexp = _lse_impl("linear_cross_entropy", logsumexp)
    logits_dtype = jnp.dtype(h_NxH.dtype if logits_dtype is None else logits_dtype)
    lead, H = labels_N.shape, h_NxH.shape[-1]
    nll = _linear_xent(h_NxH.reshape(-1, H), w_VxH, labels_N.reshape(-1), logits_dtype, logsumexp)
    return nll.reshape(lead)


def _lse_impl(op: str, logsumexp: str | None) -> str:
    """`logsumexp` checked and resolved ("auto": "pallas" on an NVIDIA GPU, else "xla"; None: "xla")."""
    return _pallas.resolve(logsumexp, _lse.IMPLEMENTATIONS, op, arg="logsumexp")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _linear_xent(h, w, labels, logits_dtype, implementation):
    return _linear_xent_fwd(h, w, labels, logits_dtype, implementation)[0]


def _linear_xent_fwd(h, w, labels, logits_dtype, implementation):
    wc = w.astype(h.dtype)
    logits = jnp.dot(h, wc.T, preferred_element_type=logits_dtype)
    nll, d = _lse.cross_entropy_and_grad(logits, labels, implementation=implementation, grad_dtype=h.dtype)
    return nll, (h, wc, d, jnp.zeros((0,), w.dtype))


def _linear_xent_bwd(logits_dtype, implementation, res, g):
    h, wc, d, w_like = res
    g = g.astype(jnp.float32)[:, None]
    dh = (jnp.dot(d, wc, preferred_element_type=jnp.float32) * g).astype(h.dtype)
    dw = jnp.dot(d.T, (h.astype(jnp.float32) * g).astype(h.dtype), preferred_element_type=jnp.float32)
    return dh, dw.astype(w_like.dtype), None


_linear_xent.defvjp(_linear_xent_fwd, _linear_xent_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _xent(logits, labels, implementation):
    return _cross_entropy(logits, labels, implementation)[0]


def _cross_entropy(logits, labels, implementation):
    x = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(x, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    lse = _lse.logsumexp(x if implementation in (None, "xla") else logits, implementation=implementation)
    return lse - picked, x, lse


@_xent.defjvp
def _cross_entropy_jvp(implementation, primals, tangents):
    logits, labels = primals
    nll, x, lse = _cross_entropy(logits, labels, implementation)
    onehot = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1) == labels[..., None]
    d_logits = tangents[0].astype(jnp.float32)
    return nll, jnp.sum((jnp.exp(x - lse[..., None]) - onehot) * d_logits, axis=-1)
