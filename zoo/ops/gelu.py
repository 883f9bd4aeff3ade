"""GPT-2's GELU (Hendrycks & Gimpel 2016, Sec. 2: the tanh approximation) as pure functions, in
the forms a train step on a GPU wants: with the bias add inside (bias_gelu_tanh, bias_gelu_sigmoid:
one pass over the matmul's output, the derivative recomputed in closed form in the backward),
written as XLA folds it into a cuBLASLt matmul's epilogue (gelu_epilogue), and with the proj matmul
after it as one op (gelu_proj: the backward's GELU derivative inside the matmul, zoo.ops.matmul_gelu).
All compute the same function; bias_gelu picks a form by name. zoo.nn.transformer's MLP uses them.

Shape letters: F the MLP's width (the GELU's features), H hidden size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from zoo.errors import UnavailableError
from zoo.ops import cublaslt as _cublaslt
from zoo.ops import matmul_gelu as _matmul_gelu
from zoo.ops.linear import add_bias, matmul, sum_rows_f32

# bias_gelu's forms: three formulas of GPT-2's GELU (bias_gelu_tanh, bias_gelu_sigmoid, gelu_epilogue)
GELU_FORMS = ("tanh", "sigmoid", "epilogue")


def gelu_tanh(h):
    """GELU, tanh approximation (as GPT-2), under jax.checkpoint: its backward recomputes the tanh
    from h instead of the forward writing tanh(...) out beside h for the backward to read back.
    Computed in float32 at least, returned in h's dtype (a bf16 h: one rounding, at the output, as
    PyTorch's autocast GELU; the bf16 formula rounds at each of its ~10 steps)."""
    return _gelu_tanh_remat(h)


def _gelu_f32(y):
    return jax.nn.gelu(y.astype(jnp.promote_types(y.dtype, jnp.float32)), approximate=True).astype(y.dtype)


_gelu_tanh_remat = jax.checkpoint(_gelu_f32)

_C, _A = _matmul_gelu._C, _matmul_gelu._A  # sqrt(2 / pi), 0.044715: GPT-2's tanh GELU


def _tanh_form(y, b):
    """(h, t, h^2): h = y + b in float32 at least, t = tanh(sqrt(2/pi) (h + 0.044715 h^3))."""
    acc = jnp.promote_types(y.dtype, jnp.float32)
    h = y.astype(acc) + b.astype(acc)
    h2 = h * h
    return h, jnp.tanh(h * (_C + _C * _A * h2)), h2


@jax.custom_vjp
def bias_gelu_tanh(y, bias):
    """gelu_tanh(y + bias): GPT-2's GELU, 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))) of
    h = y + bias, in float32 at least, the output in y's dtype. Its backward keeps y (a matmul's
    output, in memory anyway) and the bias, recomputes h and the tanh, and writes its derivative
    out in closed form, 0.5 (1 + t) + 0.5 h (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 h^2). Keeping
    y + bias or tanh(...) instead (plain autodiff, or the add outside a checkpoint) had XLA write
    a second [B * T, F] array in the forward (GPT-124M at B64 on an H200, 2026-11-26: 4.3 ms for
    12 layers). The bias gradient is the float32 sum of the y gradient as returned (rounded to
    y's dtype, as PyTorch autocast's linear layers sum their bf16 output gradient, and as the
    weight gradient x^T dy reads it): sum_rows_f32. A custom_vjp, so no forward mode (jax.jvp)
    through it: gelu_tanh(y + bias) is the same function with autodiff's derivatives."""
    h, t, _ = _tanh_form(y, bias)
    return (0.5 * h * (1 + t)).astype(y.dtype)


def _bias_gelu_tanh_bwd(res, g):
    # the barrier keeps XLA from merging this tanh(...) with the forward's (common subexpression
    # elimination): merged, the forward wrote it out in float32 ([B * T, F], 0.8 GB per layer for
    # GPT-124M at B64) for this to read back, where recomputing it from y costs nothing extra in
    # a pass that reads y anyway (the program XLA compiles for an H200: test_hlo.py)
    y, bias = jax.lax.optimization_barrier(res)
    dy = _tanh_form_grad(g, *_tanh_form(y, bias)).astype(y.dtype)
    return dy, sum_rows_f32(dy).astype(bias.dtype)


def _tanh_form_grad(g, h, t, h2):
    """g * GELU'(h) from _tanh_form's (h, t, h^2), in closed form, in h's dtype."""
    return g.astype(h.dtype) * _matmul_gelu.tanh_form_grad(h, t, h2)


bias_gelu_tanh.defvjp(lambda y, bias: (bias_gelu_tanh(y, bias), (y, bias)), _bias_gelu_tanh_bwd)


def _sigmoid_form(y, b):
    """(h, s, h^2): h = y + b in float32 at least, s = sigmoid(2 sqrt(2/pi) (h + 0.044715 h^3))."""
    acc = jnp.promote_types(y.dtype, jnp.float32)
    h = y.astype(acc) + b.astype(acc)
    h2 = h * h
    return h, jax.nn.sigmoid(h * (2 * _C + 2 * _C * _A * h2)), h2


@jax.custom_vjp
def bias_gelu_sigmoid(y, bias):
    """bias_gelu_tanh's function, written without tanh: 0.5 (1 + tanh(z)) = sigmoid(2 z), so
    GELU(h) = h * sigmoid(2 sqrt(2/pi) (h + 0.044715 h^3)) (one exp and one division where XLA's
    float32 tanh is a rational approximation of ~20 operations), with its derivative in closed
    form, s + h s (1 - s) 2 sqrt(2/pi) (1 + 3 * 0.044715 h^2), from y and the bias alone (as
    bias_gelu_tanh keeps them: the backward recomputes s). bias [F] against y [..., F]; float32
    math at least, the output in y's dtype, the bias gradient the float32 sum of the y gradient
    as returned (sum_rows_f32, as bias_gelu_tanh)."""
    h, s, _ = _sigmoid_form(y, bias)
    return (h * s).astype(y.dtype)


def _bias_gelu_sigmoid_fwd(y, bias):
    return bias_gelu_sigmoid(y, bias), (y, bias)


def _bias_gelu_sigmoid_bwd(res, g):
    y, bias = jax.lax.optimization_barrier(res)  # as _bias_gelu_tanh_bwd's
    h, s, h2 = _sigmoid_form(y, bias)
    dh = g.astype(h.dtype) * (s + h * s * (1 - s) * (2 * _C + 6 * _C * _A * h2))
    dy = dh.astype(y.dtype)
    return dy, sum_rows_f32(dy).astype(bias.dtype)


bias_gelu_sigmoid.defvjp(_bias_gelu_sigmoid_fwd, _bias_gelu_sigmoid_bwd)


@jax.custom_vjp
def gelu_epilogue(z):
    """GELU (tanh approximation) of z, written as jax.nn.gelu writes it, in z's dtype: the form
    XLA's GPU compiler folds into the cuBLASLt matmul that makes z = x @ w + bias (its
    BIAS_GELU_AUX epilogue: GELU of the float32 accumulator, one rounding, with z itself as the
    second output, kept for the backward). So the forward is no pass over [B * T, F] of its own,
    where bias_gelu_tanh's reads z and writes GELU(z) (GPT-124M at B64: 0.8 GB per layer; the
    step compiled for an H200, benchmarks/scripts/gpt_step_hlo.py); XLA matches the formula as
    jax.nn.gelu(approximate=True) emits it, which is why this one is written so. Off the matmul
    (no GPU, or z not a matmul's output) it is that formula in z's dtype: for a bf16 z, XLA:CPU
    rounds some of its steps to bf16 (within one bf16 ulp of the float32 formula's value at z;
    tests/models/test_transformer.py). The backward, as bias_gelu_tanh's: the derivative in
    float32 and in closed form from z, recomputed behind a barrier."""
    return jax.nn.gelu(z, approximate=True)


def _gelu_epilogue_bwd(z, g):
    z = jax.lax.optimization_barrier(z)  # as _bias_gelu_tanh_bwd's
    return (_tanh_form_grad(g, *_tanh_form(z, jnp.zeros((), z.dtype))).astype(z.dtype),)


gelu_epilogue.defvjp(lambda z: (gelu_epilogue(z), z), _gelu_epilogue_bwd)


def bias_gelu(y, bias, form: str = "tanh"):
    """GELU(y + bias), tanh approximation, by one of GELU_FORMS: "tanh" (bias_gelu_tanh),
    "sigmoid" (bias_gelu_sigmoid) or "epilogue" (add_bias, then gelu_epilogue: on a GPU, in the
    matmul's epilogue), the same function; bias None: no bias."""
    if form not in GELU_FORMS:
        raise ValueError(f"GELU form must be one of {', '.join(GELU_FORMS)}; got {form!r}")
    if form == "epilogue":
        return gelu_epilogue(y if bias is None else add_bias(y, bias))
    if form == "sigmoid":
        return bias_gelu_sigmoid(y, jnp.zeros(y.shape[-1], jnp.float32) if bias is None else bias)
    return gelu_tanh(y) if bias is None else bias_gelu_tanh(y, bias)


GELU_GRADS = _matmul_gelu.IMPLEMENTATIONS  # gelu_proj's implementations (MLP.gelu_grad)


def gelu_proj(y, bias, w, implementation: str = "pallas"):
    """gelu_epilogue(add_bias(y, bias)) @ w: the MLP's GELU and its proj matmul (no proj bias) as
    one op, y [..., F] (the fc matmul's output), bias [F], w [F, H] -> [..., H]. The forward is
    the plain one (on a GPU the GELU in the fc matmul's cuBLASLt epilogue). The backward reads
    GELU's input z = y + bias in zoo.ops.matmul_gelu.matmul_gelu_grad, the GELU's derivative
    applied inside the matmul that makes its input gradient, the fc bias's gradient its column
    sums ("pallas": one Triton kernel, its tile fitted to the rows; "cublaslt": cuBLASLt's
    DGELU_BGRAD epilogue, NVIDIA GPUs only; "xla": the matmul, then a pass); w's gradient is
    GELU(z).T @ g as autodiff's."""
    if implementation == "cublaslt" and jnp.dtype(y.dtype) not in _cublaslt.DTYPES:
        raise ValueError(f'gelu_proj: implementation "cublaslt" takes bfloat16 or float16 inputs, got {y.dtype}')
    if implementation == "cublaslt" and not _cublaslt.available():
        raise UnavailableError(f'gelu_proj: implementation "cublaslt" is not available here: '
                               f'{_cublaslt.unavailable_reason()}')
    return _gelu_proj(y, bias, w, implementation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gelu_proj(y, bias, w, implementation):
    return _gelu_proj_fwd(y, bias, w, implementation)[0]


def _gelu_proj_fwd(y, bias, w, implementation):
    z = add_bias(y, bias)
    a = gelu_epilogue(z)
    return matmul(a, w.astype(a.dtype)), (z, a, w.astype(a.dtype), jnp.zeros((0,), bias.dtype),
                                          jnp.zeros((0,), w.dtype))


def _gelu_proj_bwd(implementation, res, g):
    z, a, wc, bias_like, w_like = res
    F, H = wc.shape
    g2, z2 = g.reshape(-1, H).astype(z.dtype), z.reshape(-1, F)
    if implementation == "pallas":
        tile = _matmul_gelu.fit_tile(g2.shape[0], F, H)
        dz, dbias = _matmul_gelu.matmul_gelu_grad(g2, wc, z2, implementation="pallas" if tile else "xla", tile=tile)
    else:
        dz, dbias = _matmul_gelu.matmul_gelu_grad(g2, wc, z2, implementation=implementation)
    dw = matmul(a.reshape(-1, F).T, g2)
    return dz.reshape(z.shape), dbias.astype(bias_like.dtype), dw.astype(w_like.dtype)


_gelu_proj.defvjp(_gelu_proj_fwd, _gelu_proj_bwd)
