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

from zoo.ops import layer_norm as _layer_norm
from zoo.ops.attention import (KVCache, decode_attention, dot_product_attention, init_kv_cache,
                               update_kv_cache)
from zoo.ops.gelu import GELU_GRADS, bias_gelu, gelu_proj
from zoo.ops.linear import WEIGHT_GRADS, add_bias, dense as _dense, matmul

INIT_STD = 0.02  # GPT-2 / BERT initialiser scale
QKV_MODES = ("fused", "fused-split-grad", "separate")  # Attention.qkv


class LoRADense(nn.Module):
    """x @ kernel + bias, plus (alpha / r) * (x @ lora_a) @ lora_b when rank r > 0 (Hu et al. 2021);
    with gelu="tanh" (or "sigmoid", "epilogue", the same function: GELU_FORMS), GELU of that, the
    bias add inside the GELU (bias_gelu_tanh, bias_gelu_sigmoid; "epilogue": add_bias, then
    gelu_epilogue).

    In a bf16 compute dtype the float32 bias is added in bf16 (add_bias: on a GPU inside the
    matmul's cuBLASLt epilogue), its gradient, a sum over every token, summed in float32; inside
    the GELU it is added in float32 with the GELU's math.
    lora_a starts Gaussian and lora_b at zero, so adapters start as the identity update.
    weight_grad (WEIGHT_GRADS; a plain layer: a bias, no LoRA, no GELU, not bias_apart): how the
    backward makes the kernel's and bias's gradients (zoo.ops.linear.dense; "cublaslt": one
    cuBLASLt matmul with the bias gradient in its epilogue).
    """

    features: int
    rank: int = 0
    alpha: float = 16.0
    use_bias: bool = True
    kernel_std: float = INIT_STD
    dtype: Any = None  # compute dtype (params stay float32)
    gelu: str = ""  # "" (none) or a GELU_FORMS entry: GELU(x @ kernel + bias), the bias add inside the GELU
    bias_apart: bool = False  # (x @ kernel [+ lora], bias) for the next op to add (no GELU)
    weight_grad: str = "xla"  # WEIGHT_GRADS

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
        if self.weight_grad != "xla":
            if self.weight_grad not in WEIGHT_GRADS:
                raise ValueError(f"LoRADense.weight_grad must be one of {', '.join(WEIGHT_GRADS)}; got "
                                 f"{self.weight_grad!r}")
            if bias is None or lora is not None or self.gelu or self.bias_apart:
                raise ValueError(f"LoRADense.weight_grad={self.weight_grad!r} needs a plain layer: a bias, no LoRA, no "
                                 "GELU, not bias_apart")
            return _dense(x_BxI.astype(dtype), kernel, bias, weight_grad=self.weight_grad)
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
    qkv_grad: str = "xla"  # the q/k/v projections' LoRADense.weight_grad (qkv "separate" only)

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
        if self.qkv_grad != "xla" and self.qkv != "separate":
            raise ValueError(f"Attention.qkv_grad={self.qkv_grad!r} needs qkv='separate'; got qkv={self.qkv!r}")
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
            qkv = lambda f, name: dense(f, name, weight_grad=self.qkv_grad)  # noqa: E731
            q, k, v = project(x_BxTxH, [qkv(N * D, "query"), qkv(K * D, "key"), qkv(K * D, "value")])
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




class MLP(nn.Module):
    """Dense(F) -> GELU (tanh approximation, as GPT-2; `gelu` picks its formula) -> Dense(H).

    gelu_grad="pallas" or "cublaslt" (gelu "epilogue", no LoRA): the GELU and the proj matmul as
    gelu_proj, so the GELU's backward runs inside the matmul that makes its input gradient (one
    Triton kernel, or cuBLASLt's DGELU_BGRAD epilogue); the same params and function."""

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
    qkv_grad: str = "xla"  # Attention.qkv_grad

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
        h, cache = Attention(**kw, bias_apart=defer, qkv_grad=self.qkv_grad, name="attn")(
            y, mask=mask, is_causal=self.causal, cache=cache)
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
    qkv_grad: str = "xla"  # Attention.qkv_grad

    @nn.compact
    def __call__(self, x_BxTxH, *, mask=None, memory=None, memory_mask=None,
                 caches: Sequence[KVCache] | None = None, deterministic: bool = True):
        new_caches = []
        for i in range(self.num_layers):
            x_BxTxH, c = Block(self.num_heads, self.num_kv_heads, self.mlp_ratio, self.num_layers,
                               self.causal, self.cross_attention, self.dropout, self.lora_rank,
                               self.lora_alpha, self.implementation, self.ln_eps, self.dtype,
                               qkv=self.qkv, gelu=self.gelu, layer_norm=self.layer_norm, gelu_grad=self.gelu_grad,
                               qkv_grad=self.qkv_grad, name=f"block_{i}")(
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
