"""Dense-layer math as pure functions: `matmul`, whose matmul sees a 2-D input (x [..., I] runs as
one [M, I] @ [I, F] with the leading axes flattened into M, the result reshaped back to [..., F]),
and `add_bias`, a bias added in the output's dtype with its gradient summed in float32
(`sum_rows_f32`). zoo.nn.dense.Dense and zoo.nn.transformer's layers are built on them.

The values are those of x @ w; what changes is the backward: the weight gradient's dot contracts
one axis rather than every leading one, which XLA:CPU otherwise feeds by materialising
transposed copies of the activations. A GPT block (B8 T256 H256, forward + backward) ran 114.7
-> 92.7 ms on a 2-core CPU, the quick gpt_step's train step ~500 -> ~463 ms (interleaved runs,
2026-11-27). On a GPU, XLA lowers both forms to the same GEMM (the reshapes are bitcasts).

Shape letters: M rows (every leading axis), I input features, F output features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matmul(x, w):
    """x [..., I] @ w [I, F] -> [..., F], as one 2-D matmul."""
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


def sum_rows_f32(x):
    """x [..., F] summed over every axis but the last, in float32, reading x in its own dtype.

    For a bf16 x the float32 value of each element is made from its bits (a bf16 is a float32's
    upper 16 bits: exact), not by convert: XLA's GPU compiler folds convert(convert(d, bf16),
    float32) back into d (SimplifyFPConversions, on under its default xla_allow_excess_precision),
    so a sum of d.astype(bf16).astype(float32) would read the float32 d, which then must be written
    out for it: GPT-124M at B64 on an H200 (2026-11-27), the GELU backward wrote its float32 y
    gradient (0.8 GB per layer) for the bias gradient's reduction alone (0.74 ms of kernels per
    layer where reading y and g and writing dy, 1.2 GB, takes ~0.3 ms)."""
    x = x.reshape(-1, x.shape[-1])
    if x.dtype == jnp.bfloat16:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16
        return jax.lax.bitcast_convert_type(bits, jnp.float32).sum(0)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32)).sum(0)


def add_bias(y, bias, *, grad_apart: bool = False):
    """y + bias in y's dtype, with the bias gradient summed in float32.

    In float32: y + bias. In bf16 (or float16): the bias rounded to y's dtype and added there, as
    PyTorch autocast's linear layers add theirs, so XLA's GPU compiler folds the add into the
    cuBLASLt matmul that makes y (its BIAS epilogue, which adds the bias to the float32
    accumulator before the one rounding): no pass over y of its own. A float32 add of the
    bf16 y could not be folded: each of GPT-124M's separate q, k and v projections (GPTConfig.qkv
    "separate") paid a [B * T, H] read and write for it, 7.4 GB per step at B64 (the step compiled
    for an H200, benchmarks/scripts/gpt_step_hlo.py). The bias gradient is the float32 sum of y's
    gradient (sum_rows_f32): a sum over every token in bf16 is off by ~2% at 4,096 tokens
    (tests/models/test_transformer.py; GPT-124M's step sums 65,536).

    grad_apart (bf16 / float16 y): the bias gradient's reduction reads y's gradient as it is
    stored, behind an optimization barrier, never fused with what makes it. For fused_dense, whose
    output gradient is the concatenation of the projections' gradients: XLA fused that
    concatenation into the reduction (GPT-124M's q/k/v bias gradient: 1.66 TB/s on an H200,
    2026-11-27, where plain column reductions ran at 3.3-3.9) rather than read the concatenated
    array the matmuls' backward reads anyway. Elsewhere the barrier can cost a pass: y's gradient
    written out for the reduction where it could have been summed as it was made."""
    if y.dtype in (jnp.bfloat16, jnp.float16):
        return (_add_bias_16_apart if grad_apart else _add_bias_16)(y, bias)
    acc = jnp.promote_types(y.dtype, jnp.float32)
    return (y.astype(acc) + bias.astype(acc)).astype(y.dtype)


def _add_bias_16_fn(y, bias):
    return y + bias.astype(y.dtype)


_add_bias_16 = jax.custom_vjp(_add_bias_16_fn)
_add_bias_16.defvjp(lambda y, bias: (_add_bias_16(y, bias), bias),
                    lambda bias, g: (g, sum_rows_f32(g).astype(bias.dtype)))
_add_bias_16_apart = jax.custom_vjp(_add_bias_16_fn)
_add_bias_16_apart.defvjp(
    lambda y, bias: (_add_bias_16_apart(y, bias), bias),
    lambda bias, g: (g, sum_rows_f32(jax.lax.optimization_barrier(g)).astype(bias.dtype)))
