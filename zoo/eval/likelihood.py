"""Likelihood estimates from importance weights, and unit conversions.

Given K samples z_k ~ q(z|x) per example and log weights log w_k = log p(x, z_k) - log q(z_k|x),
the IWAE bound (Burda, Grosse & Salakhutdinov 2016, "Importance Weighted Autoencoders", eq. 8)

    L_K = log (1/K) sum_k w_k  <=  log p(x)

rises monotonically with K (their Theorem 1) and reaches log p(x) as K -> inf; L_1 is the ELBO.

Shape letters: K importance samples, B batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LN2 = math.log(2.0)


def iwae_bound(log_w_KxB: jax.Array) -> jax.Array:
    """IWAE bound logsumexp_k(log w) - log K per example (Burda et al. 2016, eq. 8): [K, B] -> [B]."""
    k = log_w_KxB.shape[0]
    return jax.nn.logsumexp(log_w_KxB, axis=0) - math.log(k)


def elbo_from_log_w(log_w_KxB: jax.Array) -> jax.Array:
    """Monte Carlo ELBO: mean_k log w (Burda et al. 2016, eq. 3 / Kingma & Welling 2014): [K, B] -> [B]."""
    return jnp.mean(log_w_KxB, axis=0)


def nats_to_bits(nats: jax.Array) -> jax.Array:
    """Nats to bits: divide by ln 2 (the unit of Burda et al. 2016 tables is nats; bits/dim is common)."""
    return nats / LN2


def bits_per_dim(nll_nats: jax.Array, num_dims: int) -> jax.Array:
    """NLL in nats per example -> bits per data dimension (as in van den Oord et al. 2016, PixelRNN)."""
    return nats_to_bits(nll_nats) / num_dims
