"""zoo.ops.attention's "native" implementation: FlashAttention forward and backward in C++ for the
CPU (zoo/ops/csrc/attention.cc, called through jax.ffi; zoo.ops.native compiles it on first use),
wrapped in a custom_vjp.

Shape letters: B batch, T query length, S key length, N query heads, K kv heads (N % K == 0),
G = N // K query heads per kv head, D head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from zoo.ops import native

# FlashAttention in C++ (zoo/ops/csrc/attention.cc, through jax.ffi; zoo.ops.native builds it on
# first use): one pass over each tile of logits in the core's cache, exp, row max and sum fused
# with it, where XLA's CPU runtime writes each op's tile to memory and reads it back. Float32 (other
# dtypes are computed in float32, but bfloat16 runs its products on Intel AMX tiles, forward and
# backward, where the CPU has them), head dims a multiple of 16, masks and a bias (its gradient
# only where it is differentiated).


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _native_attention(q, k, v, mask, bias, mask_kw, blocks):
    o, _ = native.attention_forward(q, k, v, mask, bias, **dict(mask_kw), block_q=blocks[0], block_k=blocks[2])
    return o


# mask: bool [B|1, N|1, T|1, S|1] or None; bias: float32 [B|1, N|1, T|1, S|1] or None; mask_kw:
# ((name, value), ...) of is_causal, window and scale; blocks: (forward rows, backward rows, keys
# per tile), hashable since both are static. With symbolic zeros the forward learns whether the
# bias is differentiated: the backward computes dbias only then.
def _native_fwd(q, k, v, mask, bias, mask_kw, blocks):
    bias_grad = bias is not None and bias.perturbed
    q, k, v, mask, bias = (None if x is None else x.value for x in (q, k, v, mask, bias))
    o, lse = native.attention_forward(q, k, v, mask, bias, **dict(mask_kw), block_q=blocks[0], block_k=blocks[2])
    return o, (q, k, v, mask, bias, o, lse, bias_grad)


def _native_bwd(mask_kw, blocks, res, do):
    q, k, v, mask, bias, o, lse, bias_grad = res
    # bf16 q, k, v (and o, do): the bf16 kernel (AMX); otherwise float32
    dq, dk, dv, dbias = native.attention_backward(q, k, v, o, lse, do.astype(o.dtype), mask, bias,
                                                  bias_grad=bias_grad, **dict(mask_kw), block_q=blocks[1],
                                                  block_k=blocks[2])
    # the mask has no gradient; dbias None: not differentiated
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, dbias


_native_attention.defvjp(_native_fwd, _native_bwd, symbolic_zeros=True)


def applies(q) -> bool:
    return q.shape[-1] % native.HEAD_DIM_MULTIPLE == 0


def attention(q, k, v, bias, mask, is_causal, window, scale, q_block_size=None, block_size=None):
    """q_block_size: query positions per forward task and backward step (default: the kernel's
    measured rows); block_size: keys per tile."""
    if not isinstance(scale, (int, float)):  # a traced scale: into q, where autodiff sees it
        q, scale = q * scale, 1.0
    G = q.shape[2] // k.shape[2]
    rows = (native.FORWARD_ROWS, native.BACKWARD_ROWS) if q_block_size is None else (q_block_size * G,) * 2
    blocks = (*rows, block_size or native.KEY_BLOCK)
    mask_kw = (("is_causal", bool(is_causal)), ("window", window), ("scale", float(scale)))
    f32 = jnp.float32
    bias = None if bias is None else bias.astype(f32)
    # bfloat16 q, k, v stay bfloat16 (the forward's products on AMX where the CPU has it); others float32
    dtype = jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in (q, k, v)) else f32
    o = _native_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask, bias, mask_kw, blocks)
    return o.astype(q.dtype)

