"""What every implementation of zoo.ops.attention shares: input checks, the causal / sliding-window
rules, which query rows see no key (they return zeros), and a softmax restricted to visible keys.

Shape letters: B batch, T query length, S key length, N query heads, K kv heads (N % K == 0),
G = N // K query heads per kv head, D head dim.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def check_inputs(q, k, v, bias, mask, window):
    """Validate shapes; return (bias, mask) padded to 4D and the window as a (left, right) tuple."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, N, D], [B, S, K, D], [B, S, K, D]; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    (B, T, N, D), (_, S, K, _) = q.shape, k.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must be [B={B}, S, K, D={D}] and equal; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    if N % K:
        raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K} (q {q.shape}, k {k.shape})")
    full = (B, N, T, S)

    def to4d(x, name):
        if x is None:
            return None
        x = jnp.asarray(x)
        if x.ndim > 4 or any(d not in (1, f) for d, f in zip(x.shape[::-1], full[::-1])):
            raise ValueError(f"{name} of shape {x.shape} does not broadcast to [B, N, T, S] = {full}")
        return x.reshape((1,) * (4 - x.ndim) + x.shape)

    bias, mask = to4d(bias, "bias"), to4d(mask, "mask")
    if mask is not None and mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be boolean (True = attend); got {mask.dtype}")
    if isinstance(window, int):
        window = (window, window)
    if window is not None and (len(window) != 2 or min(window) < 0):
        raise ValueError(f"window must be (left, right) with non-negative ints; got {window}")
    return bias, mask, None if window is None else (int(window[0]), int(window[1]))


def structural_mask(q_pos, k_pos, is_causal, window):
    """[T', S'] bool from causal/window rules for query positions q_pos and key positions k_pos."""
    allowed = jnp.ones((q_pos.shape[0], k_pos.shape[0]), bool)
    d = q_pos[:, None] - k_pos[None, :]  # query pos minus key pos
    if is_causal:
        allowed &= d >= 0
    if window is not None:
        allowed &= (d <= window[0]) & (-d <= window[1])
    return allowed


def rows_with_keys(mask, is_causal, window, T, S):
    """[B|1, N|1, T] bool: which query rows see at least one key (others must output zeros)."""
    if mask is None:  # closed form: the visible interval [lo, hi] of row i is non-empty
        i = jnp.arange(T)
        lo = jnp.maximum(0, i - window[0]) if window is not None else jnp.zeros_like(i)
        hi = jnp.full_like(i, S - 1)
        if window is not None:
            hi = jnp.minimum(hi, i + window[1])
        if is_causal:
            hi = jnp.minimum(hi, i)
        return (lo <= hi)[None, None]
    mask = mask & structural_mask(jnp.arange(T), jnp.arange(S), is_causal, window)
    return jnp.any(jnp.broadcast_to(mask, mask.shape[:2] + (T, S)), axis=-1)


def zero_empty_rows(out_BxTxNxD, rows):
    """Multiply rows with no visible key by zero ([B|1, N|1, T] -> [B|1, T, N|1, 1] broadcast)."""
    keep = jnp.transpose(rows, (0, 2, 1))[..., None].astype(out_BxTxNxD.dtype)
    return out_BxTxNxD * keep


def masked_softmax(logits, valid):
    """softmax over the last axis restricted to `valid`; all-invalid rows give zeros, not NaN."""
    logits = jnp.where(valid, logits, -jnp.inf)
    m = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # softmax is shift-invariant
    e = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)
