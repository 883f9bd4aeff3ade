"""Transformer layers (Vaswani et al. 2017) in the pre-LayerNorm arrangement of GPT-2 (Radford et
al. 2019, Sec. 2.3), on top of zoo.ops.attention: multi-head / grouped-query attention with an
optional KV cache, the GELU MLP, the block (self-attention, optional cross-attention, MLP) and a
stack of blocks. Every projection is a `LoRADense`, so LoRA adapters (zoo.ops.lora) are a config
switch (`lora_rank`) on any model built from these layers.

The KV cache is an explicit argument and result (a zoo.ops.attention.KVCache per block), not a
Flax mutable collection: `params` stays the only variable collection, and a decode step is a pure
function of (params, cache, tokens).

Shape letters: B batch, T query length, S key/memory length, H hidden size, N query heads,
K kv heads, D head dim, F MLP width, I/O a dense layer's input/output features, r LoRA rank.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.nn.dense import add_bias, matmul, sum_rows_f32
from zoo.ops import layer_norm as _layer_norm
from zoo.ops import matmul_gelu as _matmul_gelu
from zoo.ops.attention import (KVCache, decode_attention, dot_product_attention, init_kv_cache,
                               update_kv_cache)

INIT_STD = 0.02  # GPT-2 / BERT initialiser scale
QKV_MODES = ("fused", "fused-split-grad", "separate")  # Attention.qkv
# MLP.gelu: three formulas of GPT-2's GELU (bias_gelu_tanh, bias_gelu_sigmoid, gelu_epilogue)
GELU_FORMS = ("tanh", "sigmoid", "epilogue")


class LoRADense(nn.Module):
    """x @ kernel + bias, plus (alpha / r) * (x @ lora_a) @ lora_b when rank r > 0 (Hu et al. 2021);
    with gelu="tanh" (or "sigmoid", "epilogue", the same function: GELU_FORMS), GELU of that, the
    bias add inside the GELU (bias_gelu_tanh, bias_gelu_sigmoid; "epilogue": add_bias, then
    gelu_epilogue).

    In a bf16 compute dtype the float32 bias is added in bf16 (add_bias: on a GPU inside the
    matmul's cuBLASLt epilogue), its gradient, a sum over every token, summed in float32; inside
    the GELU it is added in float32 with the GELU's math.
    lora_a starts Gaussian and lora_b at zero, so adapters start as the identity update.
    """

    features: int
    rank: int = 0
    alpha: float = 16.0
    use_bias: bool = True
    kernel_std: float = INIT_STD
    dtype: Any = None  # compute dtype (params stay float32)
    gelu: str = ""  # "" (none) or a GELU_FORMS entry: GELU(x @ kernel + bias), the bias add inside the GELU
    bias_apart: bool = False  # (x @ kernel [+ lora], bias) for the next op to add (no GELU)

    @nn.compact
    def __call__(self, x_BxI, *, weights_only=False):
        """The layer's output; with weights_only, its (kernel and lora term in the compute dtype,
        bias as stored or None) instead, for fused_dense (the lora term a function of x, or None)."""
        I = x_BxI.shape[-1]
        kernel = self.param("kernel", nn.initializers.normal(self.kernel_std), (I, self.features))
        dtype = self.dtype or x_BxI.dtype
        bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        lora = None
        if self.rank:
            a = self.param("lora_a", nn.initializers.normal(1.0 / self.rank), (I, self.rank))
            b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
            lora = lambda x: (self.alpha / self.rank) * matmul(matmul(x, a.astype(dtype)), b.astype(dtype))  # noqa: E731
        if weights_only:
            return kernel.astype(dtype), bias, lora
        x = x_BxI.astype(dtype)
        y = matmul(x, kernel.astype(dtype))
        if lora is not None:
            y = y + lora(x)
        if self.gelu:
            return bias_gelu(y, bias, self.gelu)
        if self.bias_apart:
            return y, bias
        return y if bias is None else add_bias(y, bias)


def fused_dense(x, layers, *, split_grad=False):
    """[layer(x) for layer in layers] (LoRADense, no GELU) as one matmul with the kernels side by
    side: attention's query / key / value projections of the same input. Its backward is one
    matmul for x's gradient (no sum of three) and one for the kernels'; the params stay the
    layers' own (each named as before).

    split_grad=True keeps the forward's one matmul but runs the backward per layer (x's gradient
    a sum of one matmul per layer, each kernel's gradient its own matmul), so the outputs'
    gradients are never concatenated: the plain backward copies them into one [..., sum F] array
    for its two matmuls (GPT-124M at B64 on an H200, 2026-11-27: two such copies per layer, 3.4 ms
    per train step of 114.6)."""
    if any(layer.gelu for layer in layers):
        raise ValueError("fused_dense: layers with a gelu cannot share a matmul (GELU is per layer)")
    kernels, biases, loras = zip(*[layer(x, weights_only=True) for layer in layers])
    x = x.astype(kernels[0].dtype)
    if split_grad:
        ys = [y if b is None else add_bias(y, b, grad_apart=True)
              for y, b in zip(_matmul_side_by_side(x, tuple(kernels)), biases)]
    else:
        y = matmul(x, jnp.concatenate(kernels, axis=1))
        if any(b is not None for b in biases):
            y = add_bias(y, jnp.concatenate([jnp.zeros(k.shape[1], jnp.float32) if b is None else b
                                             for k, b in zip(kernels, biases)]), grad_apart=True)
        ys = jnp.split(y, _split_points(kernels), axis=-1)
    return [o if lora is None else o + lora(x) for o, lora in zip(ys, loras)]


def _split_points(kernels):
    return [sum(k.shape[1] for k in kernels[:i + 1]) for i in range(len(kernels) - 1)]


@jax.custom_vjp
def _matmul_side_by_side(x, kernels):
    """[x @ k for k in kernels] by one matmul over the kernels side by side; the backward per kernel."""
    return tuple(jnp.split(matmul(x, jnp.concatenate(kernels, axis=1)), _split_points(kernels), axis=-1))


def _matmul_side_by_side_fwd(x, kernels):
    return _matmul_side_by_side(x, kernels), (x, kernels)


def _matmul_side_by_side_bwd(res, dys):
    x, kernels = res
    dx = matmul(dys[0], kernels[0].T)
    for dy, k in zip(dys[1:], kernels[1:]):
        dx = dx + matmul(dy, k.T)
    x_MxI = x.reshape(-1, x.shape[-1])
    dks = tuple((x_MxI.T @ dy.reshape(-1, dy.shape[-1])).astype(k.dtype) for dy, k in zip(dys, kernels))
    return dx.astype(x.dtype), dks


_matmul_side_by_side.defvjp(_matmul_side_by_side_fwd, _matmul_side_by_side_bwd)


class Attention(nn.Module):
    """Multi-head attention with K <= N kv heads. Returns (out [B, T, H], cache or None).

    With `cache`, the new keys/values are written at the cache's length and the queries attend
    causally to everything cached (zoo.ops.attention.decode_attention); `is_causal`/`mask` apply
    only without a cache. `memory` [B, S, H'] makes it cross-attention (keys/values from memory).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    lora_rank: int = 0
    lora_alpha: float = 16.0
    implementation: str | None = None
    out_std: float = INIT_STD
    dtype: Any = None
    qkv: str = "fused"  # the projections of one input: one matmul ("fused"; "fused-split-grad":
    # its backward per projection, see fused_dense) or one per projection ("separate"); same params
    bias_apart: bool = False  # the output projection's (y, bias), its bias for the caller to add

    @nn.compact
    def __call__(self, x_BxTxH, memory_BxSxH=None, *, mask=None, is_causal=False,
                 cache: KVCache | None = None):
        """x [B, T, H]; for self-attention with qkv "separate" also a tuple of three equal ones,
        one per projection (as zoo.ops.layer_norm.add_layer_norm(copies=3) hands them out)."""
        if self.qkv not in QKV_MODES:
            raise ValueError(f"Attention.qkv must be one of {', '.join(QKV_MODES)}; got {self.qkv!r}")
        copies = x_BxTxH if isinstance(x_BxTxH, tuple) else None
        if copies is not None and (self.qkv != "separate" or memory_BxSxH is not None or len(copies) != 3):
            raise ValueError("Attention: a tuple x (one per projection) needs qkv='separate', self-attention "
                             f"and three arrays; got qkv={self.qkv!r}, {len(copies)} arrays"
                             f"{', cross-attention' if memory_BxSxH is not None else ''}")
        x_BxTxH = x_BxTxH if copies is None else copies[0]
        B, T, H = x_BxTxH.shape
        N, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        dense = lambda f, name, std=INIT_STD, **kw: LoRADense(f, self.lora_rank, self.lora_alpha, kernel_std=std,  # noqa: E731
                                                               dtype=self.dtype, name=name, **kw)
        project = ((lambda x, layers: [layer(x) for layer in layers]) if self.qkv == "separate" else
                   functools.partial(fused_dense, split_grad=self.qkv == "fused-split-grad"))
        if copies is not None:
            project = lambda x, layers: [layer(xi) for layer, xi in zip(layers, copies)]  # noqa: E731
        src = x_BxTxH if memory_BxSxH is None else memory_BxSxH
        if memory_BxSxH is None:  # self-attention: one matmul for the three projections
            q, k, v = project(x_BxTxH, [dense(N * D, "query"), dense(K * D, "key"), dense(K * D, "value")])
        else:
            q = dense(N * D, "query")(x_BxTxH)
            k, v = project(src, [dense(K * D, "key"), dense(K * D, "value")])
        q, k, v = q.reshape(B, T, N, D), k.reshape(B, src.shape[1], K, D), v.reshape(B, src.shape[1], K, D)
        if cache is not None:
            cache = KVCache(*cache)
            cache = cache._replace(k=cache.k.astype(k.dtype), v=cache.v.astype(v.dtype))
            cache = update_kv_cache(cache, k, v)
            out = decode_attention(q, cache, implementation=self.implementation)
        else:
            out = dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                        implementation=self.implementation)
            if self.is_mutable_collection("intermediates"):  # attention maps, only when asked for
                self.sow("intermediates", "weights", attention_weights(q, k, mask, is_causal).mean(1))
        return dense(H, "out", self.out_std, bias_apart=self.bias_apart)(out.reshape(B, T, N * D)), cache


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


GELU_GRADS = _matmul_gelu.IMPLEMENTATIONS  # MLP.gelu_grad


def gelu_proj(y, bias, w, implementation: str = "pallas"):
    """gelu_epilogue(add_bias(y, bias)) @ w: the MLP's GELU and its proj matmul (no proj bias) as
    one op, y [..., F] (the fc matmul's output), bias [F], w [F, H] -> [..., H]. The forward is
    the plain one (on a GPU the GELU in the fc matmul's cuBLASLt epilogue). The backward reads
    GELU's input z = y + bias in zoo.ops.matmul_gelu.matmul_gelu_grad, the GELU's derivative
    applied inside the matmul that makes its input gradient, the fc bias's gradient its column
    sums ("pallas": one Triton kernel, its tile fitted to the rows; "xla": the matmul, then a
    pass); w's gradient is GELU(z).T @ g as autodiff's."""
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
    tile = _matmul_gelu.fit_tile(g2.shape[0], F, H) if implementation == "pallas" else None
    dz, dbias = _matmul_gelu.matmul_gelu_grad(g2, wc, z2, implementation="pallas" if tile else "xla", tile=tile)
    dw = matmul(a.reshape(-1, F).T, g2)
    return dz.reshape(z.shape), dbias.astype(bias_like.dtype), dw.astype(w_like.dtype)


_gelu_proj.defvjp(_gelu_proj_fwd, _gelu_proj_bwd)


class MLP(nn.Module):
    """Dense(F) -> GELU (tanh approximation, as GPT-2; `gelu` picks its formula) -> Dense(H).

    gelu_grad="pallas" (gelu "epilogue", no LoRA): the GELU and the proj matmul as gelu_proj, so
    the GELU's backward runs inside the matmul that makes its input gradient (one Triton kernel);
    the same params and function."""

    width: int
    lora_rank: int = 0
    lora_alpha: float = 16.0
    out_std: float = INIT_STD
    dtype: Any = None
    gelu: str = "tanh"  # GELU_FORMS
    bias_apart: bool = False  # proj's (y, bias), its bias for the caller to add
    gelu_grad: str = "xla"  # GELU_GRADS

    @nn.compact
    def __call__(self, x_BxTxH):
        if self.gelu_grad not in GELU_GRADS:
            raise ValueError(f"MLP.gelu_grad must be one of {', '.join(GELU_GRADS)}; got {self.gelu_grad!r}")
        if self.gelu_grad != "xla":
            if self.gelu != "epilogue" or self.lora_rank:
                raise ValueError(f"MLP.gelu_grad={self.gelu_grad!r} needs gelu='epilogue' and no LoRA; got "
                                 f"gelu={self.gelu!r}, lora_rank={self.lora_rank}")
            fc = LoRADense(self.width, dtype=self.dtype, name="fc")
            kernel, bias, _ = fc(x_BxTxH, weights_only=True)
            H = x_BxTxH.shape[-1]
            proj = LoRADense(H, kernel_std=self.out_std, dtype=self.dtype, name="proj")
            w, proj_bias, _ = proj(jax.ShapeDtypeStruct((1, self.width), kernel.dtype), weights_only=True)
            y = gelu_proj(matmul(x_BxTxH.astype(kernel.dtype), kernel), bias, w, self.gelu_grad)
            if self.bias_apart:
                return y, proj_bias
            return add_bias(y, proj_bias)
        h = LoRADense(self.width, self.lora_rank, self.lora_alpha, dtype=self.dtype, gelu=self.gelu, name="fc")(x_BxTxH)
        return LoRADense(x_BxTxH.shape[-1], self.lora_rank, self.lora_alpha, kernel_std=self.out_std,
                         dtype=self.dtype, bias_apart=self.bias_apart, name="proj")(h)


LAYER_NORMS = _layer_norm.IMPLEMENTATIONS  # Block.layer_norm


class AddLayerNorm(nn.Module):
    """(r + d, LayerNorm(r + d)) by zoo.ops.layer_norm.add_layer_norm (d None: (r, LayerNorm(r))),
    with flax.linen.LayerNorm's params (scale, bias: same names, shapes and init), the output in
    `dtype` (default r's); `copies` > 1: the layer norm as a tuple of that many (see add_layer_norm)."""

    epsilon: float = 1e-5
    dtype: Any = None
    implementation: str = "pallas"
    copies: int = 1

    @nn.compact
    def __call__(self, r, d=None, d_bias=None):
        H = r.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (H,))
        bias = self.param("bias", nn.initializers.zeros, (H,))
        return _layer_norm.add_layer_norm(r, d, scale, bias, eps=self.epsilon, dtype=self.dtype,
                                          implementation=self.implementation, copies=self.copies, d_bias=d_bias)


def _residual_ln(layer_norm: str, eps: float, dtype, name: str, x, copies: int = 1):
    """x (an array, or (r, d) or (r, d, d_bias): a residual add not yet done, d's bias too) -> (the
    sum, its layer norm `name`). "xla": the add, then flax.linen.LayerNorm; "pallas": both in
    AddLayerNorm's one kernel, the layer norm as `copies` arrays when more than one (one per
    consumer, their gradients summed inside the backward kernel)."""
    r, d, d_bias = (*x, None)[:3] if isinstance(x, tuple) else (x, None, None)
    if layer_norm == "xla":
        x = r if d is None else r + (d if d_bias is None else add_bias(d, d_bias))
        return x, nn.LayerNorm(eps, dtype=dtype, name=name)(x)
    return AddLayerNorm(eps, dtype, layer_norm, copies, name=name)(r, d, d_bias)


class Block(nn.Module):
    """x + attn(LN(x)) [+ cross(LN(x), memory)] + mlp(LN(x)), each residual branch with dropout.

    Residual projections start at INIT_STD / sqrt(2 * num_layers) (GPT-2, Sec. 2.3).
    layer_norm (LAYER_NORMS): "xla", flax.linen.LayerNorm after each residual add; "auto", "pallas"
    on an NVIDIA GPU and "xla" elsewhere; "pallas", each
    residual add done inside the layer norm that follows it (AddLayerNorm: one kernel each way on
    a GPU), so the block takes and returns its stream as (r, d), the add pending, which the next
    block's first layer norm (or Stack's final one) does; the same params and function. Without
    dropout (or deterministic) the output projections' biases are added there too ((r, d,
    d_bias)), so that their gradients come out of that layer norm's backward kernel.
    """

    num_heads: int
    num_kv_heads: int
    mlp_ratio: float = 4.0
    num_layers: int = 1           # of the stack: scales the residual projections' init
    causal: bool = False
    cross_attention: bool = False
    dropout: float = 0.0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    implementation: str | None = None
    ln_eps: float = 1e-5
    dtype: Any = None
    qkv: str = "fused"  # Attention.qkv
    gelu: str = "tanh"  # MLP.gelu
    layer_norm: str = "xla"  # LAYER_NORMS
    gelu_grad: str = "xla"  # MLP.gelu_grad

    @nn.compact
    def __call__(self, x_BxTxH, *, mask=None, memory=None, memory_mask=None, cache=None,
                 deterministic: bool = True):
        if self.layer_norm not in LAYER_NORMS:
            raise ValueError(f"Block.layer_norm must be one of {', '.join(LAYER_NORMS)}; got {self.layer_norm!r}")
        layer_norm = _layer_norm.resolved(self.layer_norm)  # "auto": "pallas" on an NVIDIA GPU, else "xla"
        H = (x_BxTxH[0] if isinstance(x_BxTxH, tuple) else x_BxTxH).shape[-1]
        if H % self.num_heads:
            raise ValueError(f"hidden size {H} is not a multiple of num_heads {self.num_heads}")
        out_std = INIT_STD / (2 * self.num_layers) ** 0.5
        kw = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=H // self.num_heads,
                  lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, implementation=self.implementation,
                  out_std=out_std, dtype=self.dtype, qkv=self.qkv)
        drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=deterministic)  # noqa: E731
        # with no dropout between them, an output projection's bias goes to the next layer norm
        defer = layer_norm != "xla" and (self.dropout == 0 or deterministic)
        branch = (lambda h: h) if defer else (lambda h: (drop(h),))  # noqa: E731
        ln = functools.partial(_residual_ln, layer_norm, self.ln_eps, self.dtype)
        # separate q/k/v projections after a Pallas layer norm: its backward kernel sums their
        # three input gradients as it reads them (otherwise a pass of its own, 3.6 GB per GPT-124M step)
        x, y = ln("ln_1", x_BxTxH, copies=3 if self.qkv == "separate" and layer_norm != "xla" else 1)
        h, cache = Attention(**kw, bias_apart=defer, name="attn")(y, mask=mask, is_causal=self.causal, cache=cache)
        pending = (x, *branch(h))
        if self.cross_attention:
            cross_mask = None if memory_mask is None else memory_mask[:, None, None, :]
            x, y = ln("ln_cross", pending)
            h, _ = Attention(**kw, bias_apart=defer, name="cross_attn")(y, memory, mask=cross_mask)
            pending = (x, *branch(h))
        x, y = ln("ln_2", pending)
        h = MLP(int(H * self.mlp_ratio), self.lora_rank, self.lora_alpha, out_std, self.dtype, self.gelu,
                bias_apart=defer, gelu_grad=self.gelu_grad, name="mlp")(y)
        out = (x, *branch(h))
        return (out if layer_norm != "xla" else out[0] + out[1]), cache


class Stack(nn.Module):
    """`num_layers` Blocks then a final LayerNorm. caches: a list with one KVCache per block, or None."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    mlp_ratio: float = 4.0
    causal: bool = False
    cross_attention: bool = False
    dropout: float = 0.0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    implementation: str | None = None
    ln_eps: float = 1e-5
    dtype: Any = None
    qkv: str = "fused"  # Attention.qkv
    gelu: str = "tanh"  # MLP.gelu
    layer_norm: str = "xla"  # Block.layer_norm
    gelu_grad: str = "xla"  # MLP.gelu_grad

    @nn.compact
    def __call__(self, x_BxTxH, *, mask=None, memory=None, memory_mask=None,
                 caches: Sequence[KVCache] | None = None, deterministic: bool = True):
        new_caches = []
        for i in range(self.num_layers):
            x_BxTxH, c = Block(self.num_heads, self.num_kv_heads, self.mlp_ratio, self.num_layers,
                               self.causal, self.cross_attention, self.dropout, self.lora_rank,
                               self.lora_alpha, self.implementation, self.ln_eps, self.dtype,
                               qkv=self.qkv, gelu=self.gelu, layer_norm=self.layer_norm, gelu_grad=self.gelu_grad,
                               name=f"block_{i}")(
                x_BxTxH, mask=mask, memory=memory, memory_mask=memory_mask,
                cache=None if caches is None else caches[i], deterministic=deterministic)
            new_caches.append(c)
        _, x_BxTxH = _residual_ln(_layer_norm.resolved(self.layer_norm), self.ln_eps, self.dtype, "ln_f", x_BxTxH)
        return x_BxTxH, (None if caches is None else new_caches)


def attention_weights(q, k, mask=None, is_causal=False):
    """softmax(q k^T / sqrt(D)) over visible keys: [B, N, T, S] (for plots; not the fast path)."""
    B, T, N, D = q.shape
    k = jnp.repeat(k, N // k.shape[2], axis=2)
    s = jnp.einsum("btnd,bsnd->bnts", q, k).astype(jnp.float32) / jnp.sqrt(D).astype(jnp.float32)
    valid = jnp.ones(s.shape, bool)
    if mask is not None:
        valid = valid & mask
    if is_causal:
        valid = valid & jnp.tril(jnp.ones((T, k.shape[1]), bool))
    m = jnp.max(jnp.where(valid, s, -jnp.inf), -1, keepdims=True)
    w = jnp.where(valid, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)  # no key: all zeros
    return w / jnp.maximum(w.sum(-1, keepdims=True), 1e-30)


def init_caches(num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                dtype=jnp.float32) -> list[KVCache]:
    """One empty KVCache per block."""
    return [init_kv_cache(batch, max_len, num_kv_heads, head_dim, dtype) for _ in range(num_layers)]


def sinusoidal_positions(length: int, dim: int) -> jax.Array:
    """The fixed position encoding of Vaswani et al. 2017, Sec. 3.5: [length, dim]."""
    pos = jnp.arange(length, dtype=jnp.float32)[:, None]
    freq = jnp.exp(-jnp.log(10000.0) * jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    enc = jnp.zeros((length, dim), jnp.float32)
    enc = enc.at[:, 0::2].set(jnp.sin(pos * freq))
    return enc.at[:, 1::2].set(jnp.cos(pos * freq[: dim // 2]))
