"""Dense-layer pieces (zoo.nn.transformer's layers use both functions): `add_bias`, a bias added
in float32, and `matmul`, whose matmul sees a 2-D input: x [..., I] runs as one [M, I] @ [I, F]
with the leading axes flattened into M, the result reshaped back to [..., F]; `Dense` is flax's
Dense with that matmul.

The values are those of x @ w; what changes is the backward: the weight gradient's dot contracts
one axis rather than every leading one, which XLA:CPU otherwise feeds by materialising
transposed copies of the activations. A GPT block (B8 T256 H256, forward + backward) ran 114.7
-> 92.7 ms on a 2-core CPU, the quick gpt_step's train step ~500 -> ~463 ms (interleaved runs,
2026-11-27). On a GPU, XLA lowers both forms to the same GEMM (the reshapes are bitcasts).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


def matmul(x, w):
    """x [..., I] @ w [I, F] -> [..., F], as one 2-D matmul."""
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


def add_bias(y, bias):
    """y + bias, in float32 at least, returned in y's dtype: with y in bf16, autodiff's bias
    gradient (the sum of y's gradient over every other axis) then sums in float32, where a bf16
    sum loses ~2% over 4,096 tokens (tests/models/test_transformer.py; GPT-124M's step sums
    65,536). The converts fuse into the add's elementwise pass and the reduction's accumulator:
    no more bytes move (the GPU kernel table is to confirm it on the next lent machine)."""
    acc = jnp.promote_types(y.dtype, jnp.float32)
    return (y.astype(acc) + bias.astype(acc)).astype(y.dtype)


class Dense(nn.Dense):
    """flax.linen.Dense (same params, init and values) with the 2-D matmul of `matmul`."""

    def __call__(self, inputs):
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
        return y.reshape(*inputs.shape[:-1], self.features)
