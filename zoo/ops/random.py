"""Randomness that does not depend on how a batch is split across devices.

A loss that draws `normal(key, (B, D))` gets the same numbers under jit on any mesh (threefry is
partitionable) but not under pmap, where each device sees only its slice. Drawing per example from
`fold_in(key, idx)`, with idx the example's global position, gives the same numbers everywhere.
"""

import jax


def example_keys(key: jax.Array, idx_B: jax.Array) -> jax.Array:
    """One key per example: fold_in(key, idx[b]); [B] keys."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, idx_B)


def example_normal(key: jax.Array, idx_B: jax.Array, shape: tuple[int, ...], dtype=float) -> jax.Array:
    """Standard normal noise [B, *shape], one independent stream per example."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(example_keys(key, idx_B))


def example_uniform(key: jax.Array, idx_B: jax.Array, shape: tuple[int, ...], dtype=float) -> jax.Array:
    """Uniform [0, 1) noise [B, *shape], one independent stream per example."""
    return jax.vmap(lambda k: jax.random.uniform(k, shape, dtype))(example_keys(key, idx_B))
