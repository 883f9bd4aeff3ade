"""`Dense`: flax's Dense (same params, init and values) with zoo.ops.linear.matmul's 2-D matmul, so
its weight gradient contracts one axis (see zoo.ops.linear for why and what it saved)."""

from __future__ import annotations

import flax.linen as nn


class Dense(nn.Dense):
    """flax.linen.Dense (same params, init and values) with the 2-D matmul of zoo.ops.linear.matmul."""

    def __call__(self, inputs):
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
        return y.reshape(*inputs.shape[:-1], self.features)
