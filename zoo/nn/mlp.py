"""A multilayer perceptron: Dense -> activation, repeated (the encoder/decoder of the MLP VAE,
Kingma & Welling 2014, App. C).

Shape letters: B batch, D input features, F output features (the last entry of `features`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
    """Dense layers of widths `features`; activation after each but the last unless final_activation."""

    features: Sequence[int]
    activation: Callable[[jax.Array], jax.Array] = nn.gelu
    final_activation: bool = False

    @nn.compact
    def __call__(self, x_BxD: jax.Array) -> jax.Array:
        for i, width in enumerate(self.features):
            x_BxD = nn.Dense(width, name=f"dense_{i}")(x_BxD)
            if i < len(self.features) - 1 or self.final_activation:
                x_BxD = self.activation(x_BxD)
        return x_BxD
