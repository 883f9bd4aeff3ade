"""Pure jax.numpy math: arrays and keys in, arrays out. Nothing here imports Flax."""
