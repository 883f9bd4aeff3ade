"""Dense-layer math as pure functions: `matmul`, whose matmul sees a 2-D input (x [..., I] runs as
one [M, I] @ [I, F] with the leading axes flattened into M, the result reshaped back to [..., F]),
and `add_bias`, a bias added in the output's dtype with its gradient summed in float32
(`sum_rows_f32`). zoo.nn.dense.Dense and zoo.nn.transformer's layers are built on them.
`dense(x, w, bias, weight_grad=...)` is x @ w + bias with a choice of how its backward makes the
weight and bias gradients (WEIGHT_GRADS).

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

from zoo.errors import UnavailableError
from zoo.ops import cublaslt
from zoo.ops._pallas import by_rows

WEIGHT_GRADS = ("xla", "cublaslt")  # dense's weight_grad


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


def dense(x, w, bias, *, weight_grad: str = "xla"):
    """x [..., I] @ w [I, F] + bias [F] in x's dtype (w cast to it; the bias added as add_bias
    adds it), with the weight and bias gradients made by `weight_grad`:

    - "xla": autodiff's, the bias gradient summed in float32 (add_bias);
    - "cublaslt": one cuBLASLt matmul with a BGRAD epilogue (zoo.ops.cublaslt.wgrad: BGRADB or
      BGRADA, as wgrad_epilogue() says), which
      sums y's gradient for the bias as the weight gradient's matmul reads it: no pass over it of
      its own (GPT-124M's separate q, k and v projections at B64: 3.7 GB per step). Both come out
      of cuBLASLt in x's dtype (the weight gradient as autodiff's bf16 matmul writes it; the bias
      gradient summed in float32, rounded once), returned in w's and bias's. x bfloat16 or
      float16, I and F multiples of 8, on an NVIDIA GPU (zoo.errors.UnavailableError elsewhere,
      with the reason). Under jit over several devices (x's rows sharded) each device runs the
      call on its own rows and the gradients are summed across devices (zoo.ops._pallas.by_rows).
    x's gradient is dy @ w.T either way."""
    if weight_grad not in WEIGHT_GRADS:
        raise ValueError(f"dense: weight_grad must be one of {', '.join(WEIGHT_GRADS)}; got {weight_grad!r}")
    if w.ndim != 2 or bias.shape != (w.shape[1],) or x.shape[-1] != w.shape[0]:
        raise ValueError(f"dense: want x [..., I], w [I, F] and bias [F], got {x.shape}, {w.shape} and {bias.shape}")
    if weight_grad == "xla":
        return add_bias(matmul(x, w.astype(x.dtype)), bias)
    if jnp.dtype(x.dtype) not in cublaslt.DTYPES:
        raise ValueError(f'dense: weight_grad "cublaslt" takes a bfloat16 or float16 x, got {x.dtype}')
    rows = x.size // x.shape[-1]
    cublaslt.check_wgrad(*(jax.ShapeDtypeStruct((rows, n), x.dtype) for n in w.shape))
    why = cublaslt.wgrad_unavailable_reason()
    if why:
        raise UnavailableError(f'dense: weight_grad "cublaslt" is not available here: {why}')
    return _dense_cublaslt(x, w, bias)


@jax.custom_vjp
def _dense_cublaslt(x, w, bias):
    return matmul(x, w.astype(x.dtype)) + bias.astype(x.dtype)


def _dense_cublaslt_fwd(x, w, bias):
    return _dense_cublaslt(x, w, bias), (x, w, bias)


def _dense_cublaslt_bwd(res, dy):
    x, w, bias = res
    dx = matmul(dy, w.astype(dy.dtype).T)
    dw, db = by_rows(_wgrad_local, [x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])], ["rows", "rows"],
                     ["sum", "sum"])
    return dx, dw.astype(w.dtype), db.astype(bias.dtype)


def _wgrad_local(x, dy):
    """One device's rows' weight and bias gradients, in float32 (for the sum across devices)."""
    return tuple(o.astype(jnp.float32) for o in cublaslt.wgrad(x, dy))


_dense_cublaslt.defvjp(_dense_cublaslt_fwd, _dense_cublaslt_bwd)
