"""Attention as pure functions: scaled dot-product (seven implementations), KV-cache decoding, and
the classic additive / multiplicative attention of RNN encoder-decoders.

dot_product_attention computes softmax(q k^T * scale + bias, masked) v (Vaswani et al. 2017, eq. 1)
with jax.nn.dot_product_attention's layout and grouped-query heads (query head n reads kv head
n // (N // K)). Implementations, all giving the same values and gradients:
  "reference"  the readable definition: full [T, S] logits, softmax in float32.
  "xla"        jax.nn.dot_product_attention(implementation="xla").
  "cudnn"      jax.nn.dot_product_attention(implementation="cudnn"): fused flash attention on GPU.
  "cudnn-direct"  the same cuDNN kernel's forward called directly (zoo.ops.cudnn_direct, an FFI
               call built on first use), without the zero-fill of the output that XLA runs
               before its own cuDNN call; gradients by "cudnn". No bias, mask or window.
               Auto takes it only with ZOO_CUDNN_DIRECT=1 (not yet run through on a GPU).
  "chunked"    online softmax over key blocks in lax.scan (Rabe & Staats 2021, "Self-attention does
               not need O(n^2) memory"; Dao et al. 2022, FlashAttention, Alg. 1), with a custom_vjp
               backward that recomputes each block from the saved logsumexp (Dao et al. 2022, Alg. 2
               / appendix B.2): memory O(T * block) instead of O(T * S), forward and backward.
  "blocked"    the CPU path (no bias or mask): one kv head per loop step, its visible (query
               tile, key tile) pairs walked one per lax.scan step, each two 2D matmuls with the
               softmax between them (tiles nobody sees are left out; big tiles where every query
               sees every key, unmasked; small masked ones on a causal / window edge; one
               normaliser per row from a Cauchy-Schwarz bound, so the tiles just add up), and
               FlashAttention's backward per tile from the saved logsumexp, in the transposed
               frame. XLA's CPU dots reach ~2x the throughput on these 2D shapes that they do on
               "xla"'s batched [B, N, T, S] einsums, each tile stays in cache, and walked one at a
               time each matmul gets both cores (see the section's notes).
  "native"     FlashAttention forward and backward in C++ for the CPU (zoo/ops/csrc/attention.cc,
               called through jax.ffi; zoo.ops.native compiles it on first use): each tile of
               logits makes one trip through the core's cache, where XLA writes every op's tile to
               memory and reads it back. Masks and a bias; head dims a multiple of 16; computes in
               float32. Where no C++ compiler is found, auto falls back to the XLA paths.

Where they live: this module holds the dispatch (auto included), "reference", "xla" / "cudnn"
and KV-cache decoding; chunked.py, blocked.py and native_cpu.py one implementation each; masks.py
the checks and mask rules they all share; rnn.py the RNN attention.

Conventions shared by every implementation:
  * Causal and window masks align query i with key i (top-left), as jax.nn does for both "xla"
    (tril(ones(T, S))) and "cudnn" (MaskType.CAUSAL): with T != S, query i sees keys j <= i, not
    j <= i + S - T. For decoding with an offset use decode_attention, which aligns bottom-right.
  * window=(left, right): query i sees keys j with i - left <= j <= i + right (jax.nn's
    local_window_size); combined with is_causal, right is effectively 0.
  * A query row with no visible key returns zeros (jax.nn alone would return the mean of v), and
    its gradients are zero. Mask with `mask`, not with -inf in `bias`: bias must be finite.

Classic attention for RNNs: additive (Bahdanau et al. 2015, eq. 6 and appendix A.1.2: score =
v_a^T tanh(W_q q + W_k k)) and multiplicative (Luong et al. 2015, eq. 8: "general" q^T W k, "dot").

Shape letters: B batch, T query length, S key length, N query heads, K kv heads (N % K == 0),
G = N // K query heads per kv head, D head dim, H hidden size (RNN attention), A attention size.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from zoo.errors import ConfigError, UnavailableError
from zoo.ops import cudnn_direct, native
from zoo.ops.attention import blocked, chunked, native_cpu
from zoo.ops.attention.masks import check_inputs, masked_softmax, rows_with_keys, structural_mask, zero_empty_rows
from zoo.ops.attention.rnn import additive_attention, multiplicative_attention

__all__ = ["IMPLEMENTATIONS", "dot_product_attention", "KVCache", "init_kv_cache", "update_kv_cache",
           "decode_attention", "additive_attention", "multiplicative_attention"]

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "cudnn-direct", "chunked", "blocked", "native")


# ------------------------------------------------------------------------------------ reference


def _reference(q, k, v, bias, mask, is_causal, window, scale):
    T, S, N, K = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)  # kv head n // G
    logits_BxNxTxS = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits_BxNxTxS = logits_BxNxTxS + bias.astype(jnp.float32)
    valid = structural_mask(jnp.arange(T), jnp.arange(S), is_causal, window)[None, None]
    if mask is not None:
        valid = valid & mask
    probs = masked_softmax(logits_BxNxTxS, valid)
    return jnp.einsum("bnts,bsnd->btnd", probs, v.astype(jnp.float32)).astype(q.dtype)


# ------------------------------------------------------------------------------------ xla, cudnn


def _jax_nn(q, k, v, bias, mask, is_causal, window, scale, implementation):
    T, S = q.shape[1], k.shape[1]
    if implementation == "cudnn" and window is not None and window[1] > 0 and not is_causal:
        # cuDNN's sliding window is left-only; fold a two-sided window into the mask instead.
        wmask = structural_mask(jnp.arange(T), jnp.arange(S), False, window)[None, None]
        mask, window = (wmask if mask is None else mask & wmask), None
    if implementation == "cudnn":  # broadcast bias/mask over T and S: cuDNN wants full rows
        B, N = q.shape[0], q.shape[2]
        if bias is not None:
            bias = jnp.broadcast_to(bias, bias.shape[:2] + (T, S)).astype(q.dtype)
        if mask is not None:
            mask = jnp.broadcast_to(mask, (B, N, T, S))
    try:
        out = jax.nn.dot_product_attention(q, k, v, bias, mask, scale=scale, is_causal=is_causal,
                                           local_window_size=window, implementation=implementation)
    except RuntimeError as e:  # e.g. "cuDNN is not detected": no GPU here
        raise UnavailableError(f"implementation {implementation!r} cannot run here: {e}") from e
    if mask is None and not is_causal and window is None:
        return out
    return zero_empty_rows(out, rows_with_keys(mask, is_causal, window, T, S))


def _cudnn_applies(q, k) -> bool:
    """Shapes/dtypes cuDNN flash attention takes (fp16/bf16, D <= 128 and a multiple of 8)."""
    D = q.shape[-1]
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and k.dtype == q.dtype and D <= 128 and D % 8 == 0)


# ---------------------------------------------------------------------------------- cudnn-direct
# The forward by cuDNN called directly (zoo.ops.cudnn_direct: no zero-fill of the output before
# the kernel, which XLA's own cuDNN call does), the gradients by JAX's cuDNN call: differentiated,
# the custom_vjp's forward is "cudnn" itself (jax.vjp), so a train step runs exactly the "cudnn"
# program, and only undifferentiated forwards (inference, sampling, evaluation) take the direct call.
DIRECT_GRAD = "cudnn"  # what differentiates "cudnn-direct" (read when tracing)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _direct(q, k, v, is_causal, scale):
    return cudnn_direct.attention_forward(q, k, v, scale=scale, is_causal=is_causal)


def _direct_fwd(q, k, v, is_causal, scale):
    return jax.vjp(lambda q, k, v: _jax_nn(q, k, v, None, None, is_causal, None, scale, DIRECT_GRAD), q, k, v)


def _direct_bwd(is_causal, scale, vjp, g):
    return vjp(g)


_direct.defvjp(_direct_fwd, _direct_bwd)


def _direct_applies(q, k, v, bias, mask, window) -> bool:
    return _cudnn_applies(q, k) and v.dtype == q.dtype and bias is None and mask is None and window is None


# ---------------------------------------------------------------------------------------- public


CPU_BLOCKS = (128, 1024)  # auto on CPU: (query block, key block) of "chunked"
CPU_NARROW_HEAD = 16      # auto on CPU: heads this narrow, unmasked, go one example at a time
CPU_NARROW_LOGITS = 2**22  # ... when one example's [N, T, S] float32 logits fit in 16 MiB
# auto on CPU: "native" (head dim a multiple of 16) from this many logits per
# head. fwd / fwd+bwd vs "xla" on 2 cores (benchmarks/results/README.md): B32 T64 N4 D32 causal
# 1.4 / 3.2 ms vs 2.1 / 4.8; B8 T256 N4 D64 causal 3.9 / 9.2 vs 11.8 / 25.4; B64 T16 N4 D16
# 0.81 / 1.46 vs 0.64 / 1.59 (the threads' start-up outweighs 16 x 16 tiles). With a key padding
# mask, vs "chunked" with query blocks (auto's choice for masks before): B16 T128 N4 D64 4.8 / 10.9
# vs 8.5 / 29.9 ms, B8 T512 N8 D64 40 / 116 vs 138 / 409.
CPU_NATIVE_MIN_LOGITS = 64 * 64


def _per_example(q, k, v, scale):
    """Unmasked attention for narrow heads on CPU: one batch element per lax.map step, softmax
    normalised after the second matmul (a divide over [T, N, D], not over [N, T, S]).

    With D = 8 (the UNet's heads) the [N, T, S] weights dwarf q, k and v, so every elementwise pass
    over them is a pass through memory: per example they stay in cache, and deferring the division
    saves one pass. B8 T256 N8 D8 f32 on 2 cores: 13-15 ms vs 55-65 ms for "xla" and 18-25 ms for
    PyTorch's SDPA (benchmarks/results/README.md, zoo bench diffusion).
    """
    N, K = q.shape[2], k.shape[2]
    k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)

    def one(qkv):
        q_TxNxD, k_SxNxD, v_SxNxD = qkv
        s_NxTxS = jnp.einsum("tnd,snd->nts", q_TxNxD, k_SxNxD, preferred_element_type=jnp.float32) * scale
        e_NxTxS = jnp.exp(s_NxTxS - s_NxTxS.max(-1, keepdims=True))
        o_NxTxD = jnp.einsum("nts,snd->ntd", e_NxTxS.astype(v_SxNxD.dtype), v_SxNxD,
                             preferred_element_type=jnp.float32) / e_NxTxS.sum(-1)[..., None]
        return o_NxTxD.transpose(1, 0, 2).astype(q_TxNxD.dtype)

    return lax.map(one, (q, k, v))


def _auto(q, k, bias, mask, is_causal, window, v=None):
    """cuDNN where it applies (called directly where zoo.ops.cudnn_direct builds, ZOO_CUDNN_DIRECT=1
    asks for it and there is no bias, mask or window; else through JAX); on CPU the C++ kernel
    ("native") where it applies and builds, else
    "blocked" (or "chunked" with query blocks when there is a bias or mask) once the logits
    outgrow the caches; else "xla", or "chunked" once the full logits would be huge."""
    if _cudnn_applies(q, k):
        direct = _direct_applies(q, k, k if v is None else v, bias, mask, window) and cudnn_direct.chosen_by_auto() is None
        return "cudnn-direct" if direct else "cudnn"
    B, T, N, _ = q.shape
    S = k.shape[1]
    if jax.default_backend() == "cpu" and T * S >= CPU_NATIVE_MIN_LOGITS and native_cpu.applies(q) and native.available():
        return "native"
    # On CPU, XLA runs each op of "xla" over the whole [B, N, T, S] logits: the matmul writes them
    # to memory and softmax's passes read them back (an elementwise pass over 32 MiB costs as much
    # as the matmul, see benchmarks/results/README.md). "blocked" runs one head at a time through
    # 2D matmuls on cache-sized tiles: 2-4x "chunked", 0.75-0.95x PyTorch's flash kernel at
    # B1 N8 D64 S1024-4096 f32, at any length (the tiles are walked by lax.scan, not unrolled).
    if jax.default_backend() == "cpu" and T >= 2 * CPU_BLOCKS[0] and S >= 256 and q.shape[-1] > CPU_NARROW_HEAD:
        return "blocked" if bias is None and mask is None else "chunked-cpu"
    if (jax.default_backend() == "cpu" and q.shape[-1] <= CPU_NARROW_HEAD and N * T * S <= CPU_NARROW_LOGITS
            and bias is None and mask is None and not is_causal and window is None):
        return "per-example-cpu"
    return "chunked" if B * N * T * S * 4 > 2**30 else "xla"


def dot_product_attention(q, k, v, *, bias=None, mask=None, is_causal=False, window=None,
                          scale=None, implementation=None, block_size=None, q_block_size=None):
    """softmax(q k^T * scale + bias) v over visible keys: q [B,T,N,D], k/v [B,S,K,D] -> [B,T,N,D].

    mask: bool, broadcastable to [B, N, T, S], True = attend (a key padding mask [B, S] is
    mask[:, None, None, :]). bias: additive, broadcastable to [B, N, T, S]. window: (left, right)
    or an int for both. scale defaults to 1/sqrt(D). implementation: one of IMPLEMENTATIONS or None
    (auto: cuDNN on GPU for fp16/bf16, called directly ("cudnn-direct") where ZOO_CUDNN_DIRECT=1
    asks for it, zoo.ops.cudnn_direct builds and there is no bias, mask or window; on CPU "native", a C++ FlashAttention kernel built on first
    use (zoo.ops.native), for head dims that are a multiple of 16 and T * S >=
    4096; else one example at a time for unmasked heads of D <= 16, and when T, S >= 256 "blocked"
    (no bias or mask) or "chunked" with query blocks; else "xla", or "chunked" when the
    [B, N, T, S] float32 logits would pass 1 GiB). block_size: keys per
    block for "chunked" (default 512; S need not divide it), "blocked" and "native" (default: the
    measured BLOCKED_* / native.KEY_BLOCK sizes; native rounds up to a multiple of 32);
    q_block_size: queries per block (chunked's default: all; native's: 128 rows forward and
    backward, a row being one query position of one grouped head).
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; valid: "
                         f"{', '.join(IMPLEMENTATIONS)} or None (auto)")
    bias, mask, window = check_inputs(q, k, v, bias, mask, window)
    for name, size in (("block_size", block_size), ("q_block_size", q_block_size)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{name} must be a positive int; got {size!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    impl = implementation or _auto(q, k, bias, mask, is_causal, window, v)
    if impl == "per-example-cpu":
        return _per_example(q, k, v, scale)
    if impl == "chunked-cpu":
        return chunked.chunked(q, k, v, bias, mask, is_causal, window, scale, CPU_BLOCKS[1], CPU_BLOCKS[0])
    if impl == "blocked":
        if bias is not None or mask is not None:
            raise ValueError('implementation "blocked" takes is_causal and window only, not bias or '
                             'mask; use "chunked" (or None) for those')
        sizes = (q_block_size, block_size) if implementation else (None, None)  # auto: measured sizes
        return blocked.blocked(q, k, v, is_causal, window, scale, *sizes)
    if impl == "native":
        if not native_cpu.applies(q):
            raise ValueError(f'implementation "native" needs a head dim that is a multiple of '
                             f'{native.HEAD_DIM_MULTIPLE}; got {q.shape[-1]}; use None (auto) for others')
        if not native.available():
            raise UnavailableError(f'implementation "native" is not available here: {native.unavailable_reason()}')
        sizes = (q_block_size, block_size) if implementation else (None, None)  # auto: measured sizes
        return native_cpu.attention(q, k, v, bias, mask, is_causal, window, scale, *sizes)
    if impl == "cudnn-direct":
        if not _direct_applies(q, k, v, bias, mask, window):
            raise ConfigError('implementation "cudnn-direct" takes bfloat16 / float16 q, k, v with a head dim '
                             '<= 128 and a multiple of 8 on a GPU, and is_causal only (no bias, mask or '
                             f'window); got {q.dtype} D={q.shape[-1]} on {jax.default_backend()}; use "cudnn" '
                             'or None (auto)')
        if not cudnn_direct.available():
            raise UnavailableError(f'implementation "cudnn-direct" is not available here: '
                                   f'{cudnn_direct.unavailable_reason()}')
        if not isinstance(scale, (int, float)):  # a traced scale: into q, where autodiff sees it
            q, scale = q * scale, 1.0
        return _direct(q, k, v, bool(is_causal), float(scale))
    if impl == "reference":
        return _reference(q, k, v, bias, mask, is_causal, window, scale)
    if impl == "chunked":
        return chunked.chunked(q, k, v, bias, mask, is_causal, window, scale, block_size or 512, q_block_size)
    return _jax_nn(q, k, v, bias, mask, is_causal, window, scale, impl)


# -------------------------------------------------------------------------------- KV-cache decode


class KVCache(NamedTuple):
    """Fixed-size keys/values [B, max_len, K, D]; positions [0, length) are filled."""

    k: jax.Array
    v: jax.Array
    length: jax.Array  # int32 scalar


def init_kv_cache(batch, max_len, num_kv_heads, head_dim, dtype=jnp.float32) -> KVCache:
    """An empty cache."""
    zeros = jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype)
    return KVCache(zeros, zeros, jnp.zeros((), jnp.int32))


def update_kv_cache(cache: KVCache, k_new, v_new) -> KVCache:
    """Write k_new/v_new [B, T_new, K, D] at position `length`; the arrays keep their size.

    Writing past max_len cannot raise under jit: dynamic_update_slice clamps the start, so size the
    cache for the longest sequence.
    """
    if k_new.shape != v_new.shape or k_new.shape[::2] != cache.k.shape[::2] or k_new.ndim != 4:
        raise ValueError(f"k_new/v_new must be [B, T_new, K, D] matching the cache {cache.k.shape}; "
                         f"got {k_new.shape}, {v_new.shape}")
    start = (0, cache.length, 0, 0)
    return KVCache(lax.dynamic_update_slice(cache.k, k_new.astype(cache.k.dtype), start),
                   lax.dynamic_update_slice(cache.v, v_new.astype(cache.v.dtype), start),
                   cache.length + k_new.shape[1])


def decode_attention(q, cache: KVCache, *, scale=None, implementation=None):
    """Causal attention of q [B, T_new, N, D] to an updated cache -> [B, T_new, N, D].

    Call after update_kv_cache with the same T_new tokens: query i sits at position
    length - T_new + i and sees cache positions <= its own (bottom-right alignment), so a prefill
    of T_new tokens and one-token steps both give the full causal forward's rows.
    """
    T_new, max_len = q.shape[1], cache.k.shape[1]
    q_pos = cache.length - T_new + jnp.arange(T_new)
    mask = (jnp.arange(max_len)[None, :] <= q_pos[:, None])[None, None]
    return dot_product_attention(q, cache.k, cache.v, mask=mask, scale=scale,
                                 implementation=implementation)

