"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling.

Filters return logits with the removed tokens set to -inf, so they compose (temperature, then
top-k, then top-p: the order of Hugging Face's generate) and feed jax.random.categorical.
Nucleus sampling is from Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", eq. 2
(the smallest prefix of the sorted distribution whose mass reaches p); top-k from Fan et al. 2018.
Ties are broken deterministically: among equal logits the lower token index ranks first.

Shape letters: B batch, V vocabulary.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jax import lax


def _check_logits(logits_BxV):
    logits_BxV = jnp.asarray(logits_BxV)
    if logits_BxV.ndim != 2:
        raise ValueError(f"logits must be [B, V]; got shape {logits_BxV.shape}")
    return logits_BxV


def _check_k(k, V):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= V:
        raise ValueError(f"top_k must be an int in [1, V={V}]; got {k!r}")


def _check_p(p):
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1]; got {p!r}")


def greedy(logits_BxV) -> jax.Array:
    """The most likely token (lowest index among ties): [B] int32."""
    return jnp.argmax(_check_logits(logits_BxV), axis=-1).astype(jnp.int32)


def sample_temperature(key, logits_BxV, temperature) -> jax.Array:
    """A draw from softmax(logits / temperature): [B] int32; temperature 0 is greedy.

    A Python number is checked (must be >= 0) and picks the branch at trace time; an array
    temperature (traced) chooses per call with jnp.where.
    """
    logits_BxV = _check_logits(logits_BxV)
    if isinstance(temperature, numbers.Number):
        if not temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
        if temperature == 0:
            return greedy(logits_BxV)
        return jax.random.categorical(key, logits_BxV / temperature, axis=-1).astype(jnp.int32)
    t = jnp.asarray(temperature, jnp.float32)
    drawn = jax.random.categorical(key, logits_BxV / jnp.where(t > 0, t, 1.0), axis=-1)
    return jnp.where(t > 0, drawn, jnp.argmax(logits_BxV, axis=-1)).astype(jnp.int32)


def top_k_filter(logits_BxV, k: int) -> jax.Array:
    """Keep exactly the k largest logits per row (ties: lower index wins), the rest -> -inf."""
    logits_BxV = _check_logits(logits_BxV)
    _check_k(k, logits_BxV.shape[-1])
    _, idx_Bxk = lax.top_k(logits_BxV, k)  # ties come out in index order
    keep = jnp.zeros(logits_BxV.shape, bool).at[jnp.arange(logits_BxV.shape[0])[:, None], idx_Bxk].set(True)
    return jnp.where(keep, logits_BxV, -jnp.inf)


def top_p_filter(logits_BxV, p: float) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one token).

    Tokens are ranked by logit, ties by lower index; a token tied with the last kept one but ranked
    after it is removed, so the kept set is always a prefix of that order.
    """
    logits_BxV = _check_logits(logits_BxV)
    _check_p(p)
    if p == 1:
        return logits_BxV
    order_BxV = jnp.argsort(-logits_BxV, axis=-1, stable=True)
    sorted_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV.astype(jnp.float32), axis=-1)
    mass_before = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the higher-ranked tokens
    keep_sorted = mass_before < p  # rank 0 always kept: mass_before = 0 < p
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order_BxV, axis=-1), axis=-1)
    return jnp.where(keep, logits_BxV, -jnp.inf)


def sample_logits(key, logits_BxV, *, temperature=1.0, top_k=None, top_p=None) -> jax.Array:
    """Temperature, then top-k, then top-p, then a categorical draw: [B] int32; temperature 0 is greedy."""
    logits_BxV = _check_logits(logits_BxV)
    if not isinstance(temperature, numbers.Number) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy); got {temperature!r}")
    if top_k is not None:  # checked even when greedy makes them moot
        _check_k(top_k, logits_BxV.shape[-1])
    if top_p is not None:
        _check_p(top_p)
    if temperature == 0:  # the argmax survives every filter
        return greedy(logits_BxV)
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    if top_k is not None:
        logits_BxV = top_k_filter(logits_BxV, top_k)
    if top_p is not None:
        logits_BxV = top_p_filter(logits_BxV, top_p)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)
