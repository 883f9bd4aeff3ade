"""What zoo.ops's Pallas (Triton) kernels share: where they run, and their power-of-two tiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def run(call, *args):
    """call(interpret)(*args): the Triton kernel where the program is lowered for a CUDA GPU,
    Pallas's interpreter elsewhere (correct, slow; chosen as it lowers: jax.lax.platform_dependent)."""
    return jax.lax.platform_dependent(*args, cuda=call(False), default=call(True))


def columns(n: int, width: int | None = None, start=0):
    """(indices, mask) of a tile's columns: Triton's arrays have power-of-two sizes, so a tile
    `width` wide (default: n's next power of two) from `start`, masked to the n columns there are."""
    from jax.experimental import pallas as pl

    width = pl.next_power_of_2(n) if width is None else width
    cols = start + jnp.arange(width)
    return cols, cols < n
