"""Sinusoidal embeddings of diffusion timesteps (Vaswani et al. 2017, Sec. 3.5, applied to t as in
Ho et al. 2020, App. B), shared by the UNet and the DiT.

Shape letters: B batch, F features (dim), Q = F // 2 frequencies.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def timestep_embedding(t_B, dim: int, *, max_period: float = 10000.0) -> jax.Array:
    """[B, dim] float32 sinusoidal features of (possibly fractional) timesteps, cos half first.

    Frequencies max_period^(-i / (dim/2)) for i < dim/2, computed in float32 as both reference
    codes do: diffusers' get_timestep_embedding with flip_sin_to_cos=True, downscale_freq_shift=0
    (the UNet) and the official DiT's TimestepEmbedder. An odd dim gets a zero last column.
    """
    Q = dim // 2
    freqs_Q = jnp.exp(-math.log(max_period) * jnp.arange(Q, dtype=jnp.float32) / Q)
    arg_BxQ = jnp.asarray(t_B, jnp.float32)[:, None] * freqs_Q[None, :]
    emb_BxF = jnp.concatenate([jnp.cos(arg_BxQ), jnp.sin(arg_BxQ)], axis=-1)
    return jnp.pad(emb_BxF, ((0, 0), (0, dim % 2)))
