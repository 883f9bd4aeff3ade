"""Attention as pure functions: scaled dot-product (seven implementations), KV-cache decoding, and
the classic additive / multiplicative attention of RNN encoder-decoders.

dot_product_attention computes softmax(q k^T * scale + bias, masked) v (Vaswani et al. 2017, eq. 1)
with jax.nn.dot_product_attention's layout and grouped-query heads (query head n reads kv head
n // (N // K)). Implementations, all giving the same values and gradients:
  "reference"  the readable definition: full [T, S] logits, softmax in float32.
  "xla"        jax.nn.dot_product_attention(implementation="xla").
  "cudnn"      jax.nn.dot_product_attention(implementation="cudnn"): fused flash attention on GPU.
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
import numpy as np
from jax import lax

from zoo.ops import native

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "chunked", "blocked", "native")


# ----------------------------------------------------------------------------------- checks, masks


def _check(q, k, v, bias, mask, window):
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


def _structural_mask(q_pos, k_pos, is_causal, window):
    """[T', S'] bool from causal/window rules for query positions q_pos and key positions k_pos."""
    allowed = jnp.ones((q_pos.shape[0], k_pos.shape[0]), bool)
    d = q_pos[:, None] - k_pos[None, :]  # query pos minus key pos
    if is_causal:
        allowed &= d >= 0
    if window is not None:
        allowed &= (d <= window[0]) & (-d <= window[1])
    return allowed


def _rows_with_keys(mask, is_causal, window, T, S):
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
    mask = mask & _structural_mask(jnp.arange(T), jnp.arange(S), is_causal, window)
    return jnp.any(jnp.broadcast_to(mask, mask.shape[:2] + (T, S)), axis=-1)


def _zero_empty_rows(out_BxTxNxD, rows):
    """Multiply rows with no visible key by zero ([B|1, N|1, T] -> [B|1, T, N|1, 1] broadcast)."""
    keep = jnp.transpose(rows, (0, 2, 1))[..., None].astype(out_BxTxNxD.dtype)
    return out_BxTxNxD * keep


# ------------------------------------------------------------------------------------ reference


def _masked_softmax(logits, valid):
    """softmax over the last axis restricted to `valid`; all-invalid rows give zeros, not NaN."""
    logits = jnp.where(valid, logits, -jnp.inf)
    m = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # softmax is shift-invariant
    e = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def _reference(q, k, v, bias, mask, is_causal, window, scale):
    T, S, N, K = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)  # kv head n // G
    logits_BxNxTxS = jnp.einsum("btnd,bsnd->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits_BxNxTxS = logits_BxNxTxS + bias.astype(jnp.float32)
    valid = _structural_mask(jnp.arange(T), jnp.arange(S), is_causal, window)[None, None]
    if mask is not None:
        valid = valid & mask
    probs = _masked_softmax(logits_BxNxTxS, valid)
    return jnp.einsum("bnts,bsnd->btnd", probs, v.astype(jnp.float32)).astype(q.dtype)


# ------------------------------------------------------------------------------------ xla, cudnn


def _jax_nn(q, k, v, bias, mask, is_causal, window, scale, implementation):
    T, S = q.shape[1], k.shape[1]
    if implementation == "cudnn" and window is not None and window[1] > 0 and not is_causal:
        # cuDNN's sliding window is left-only; fold a two-sided window into the mask instead.
        wmask = _structural_mask(jnp.arange(T), jnp.arange(S), False, window)[None, None]
        mask, window = (wmask if mask is None else mask & wmask), None
    if implementation == "cudnn":  # broadcast bias/mask over T and S: cuDNN wants full rows
        B, N = q.shape[0], q.shape[2]
        if bias is not None:
            bias = jnp.broadcast_to(bias, bias.shape[:2] + (T, S)).astype(q.dtype)
        if mask is not None:
            mask = jnp.broadcast_to(mask, (B, N, T, S))
    out = jax.nn.dot_product_attention(q, k, v, bias, mask, scale=scale, is_causal=is_causal,
                                       local_window_size=window, implementation=implementation)
    if mask is None and not is_causal and window is None:
        return out
    return _zero_empty_rows(out, _rows_with_keys(mask, is_causal, window, T, S))


def _cudnn_applies(q, k) -> bool:
    """Shapes/dtypes cuDNN flash attention takes (fp16/bf16, D <= 128 and a multiple of 8)."""
    D = q.shape[-1]
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and k.dtype == q.dtype and D <= 128 and D % 8 == 0)


# --------------------------------------------------------------------------------------- chunked
# Layout inside: q [B, T, K, G, D]; keys in blocks [nb, B, blk, K, D]; bias/mask in blocks
# [nb, B|1, K|1, G|1, T|1, blk]. Padding, broadcasting and head grouping happen outside the
# custom_vjp, so autodiff reduces the gradients of those reshapes for us.


def _block_valid(q_pos, j, cfg):
    """[T, blk] bool: the causal/window/padding rules for key block j and query positions q_pos."""
    _, is_causal, window, S, blk = cfg
    k_pos = j * blk + jnp.arange(blk)
    return _structural_mask(q_pos, k_pos, is_causal, window) & (k_pos < S)


def _block_needed(q_pos, j, cfg):
    """Whether any query of the block may see key block j (else the block is skipped)."""
    _, is_causal, window, S, blk = cfg
    if not is_causal and window is None:
        return jnp.bool_(True)
    return jnp.any(_block_valid(q_pos, j, cfg))


def _block_logits(q5, k_blk, bias_blk, mask_blk, j, q_pos, cfg):
    """Logits [B, K, G, T, blk] of key block j for queries at q_pos, and where they are visible."""
    scale = cfg[0]
    s = jnp.einsum("btkgd,bskd->bkgts", q5, k_blk, preferred_element_type=jnp.float32) * scale
    if bias_blk is not None:
        s = s + bias_blk.astype(jnp.float32)
    valid = _block_valid(q_pos, j, cfg)[None, None, None]
    if mask_blk is not None:
        valid = valid & mask_blk
    return s, valid


def _flash_fwd(cfg, q5, kb, vb, bb, mb, q_pos):
    B, T, K, G, D = q5.shape

    def step(carry, xs):
        m, l, acc = carry
        k_blk, v_blk, b_blk, m_blk, j = xs
        s, valid = _block_logits(q5, k_blk, b_blk, m_blk, j, q_pos, cfg)
        m_new = jnp.maximum(m, jnp.max(jnp.where(valid, s, -jnp.inf), axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all-masked so far: keep exp finite
        p = jnp.where(valid, jnp.exp(s - m_safe[..., None]), 0.0)
        corr = jnp.exp(m - m_safe)  # rescales the running sums to the new max (0 at the start)
        pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v_blk.dtype), v_blk,
                        preferred_element_type=jnp.float32)
        return (m_new, l * corr + jnp.sum(p, -1), acc * corr[..., None] + pv)

    def maybe(carry, xs):  # key blocks no query here can see (causal, window) cost nothing
        return lax.cond(_block_needed(q_pos, xs[-1], cfg), step, lambda c, _: c, carry, xs), None

    init = (jnp.full((B, K, G, T), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
            jnp.zeros((B, K, G, T, D), jnp.float32))
    (m, l, acc), _ = lax.scan(maybe, init, (kb, vb, bb, mb, jnp.arange(kb.shape[0])))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # rows with no visible key stay 0
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)  # exp(s - inf) = 0
    out5 = jnp.transpose(out, (0, 3, 1, 2, 4)).astype(q5.dtype)
    return out5, (q5, kb, vb, bb, mb, q_pos, out5, lse)


def _sum_to(x, shape):
    """Sum x over the axes where `shape` has a broadcast 1."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
    return jnp.sum(x, axis=axes, keepdims=True)


def _flash_bwd(cfg, res, dout5):
    q5, kb, vb, bb, mb, q_pos, out5, lse = res
    scale = cfg[0]
    dout5 = dout5.astype(jnp.float32)
    delta = jnp.transpose(jnp.sum(dout5 * out5.astype(jnp.float32), -1), (0, 2, 3, 1))  # [B,K,G,T]

    def step(dq, xs):
        k_blk, v_blk, b_blk, m_blk, j = xs
        s, valid = _block_logits(q5, k_blk, b_blk, m_blk, j, q_pos, cfg)
        p = jnp.where(valid, jnp.exp(s - lse[..., None]), 0.0)  # the forward's probabilities
        dv = jnp.einsum("bkgts,btkgd->bskd", p, dout5)
        dp = jnp.einsum("btkgd,bskd->bkgts", dout5, v_blk.astype(jnp.float32))
        ds = p * (dp - delta[..., None])  # softmax backward, row by row
        dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds, k_blk.astype(jnp.float32)) * scale
        dk = jnp.einsum("bkgts,btkgd->bskd", ds, q5.astype(jnp.float32)) * scale
        db = None if b_blk is None else _sum_to(ds, b_blk.shape).astype(b_blk.dtype)
        return dq, (dk.astype(k_blk.dtype), dv.astype(v_blk.dtype), db)

    def skip(dq, xs):
        k_blk, v_blk, b_blk = xs[:3]
        db = None if b_blk is None else jnp.zeros(b_blk.shape, b_blk.dtype)
        return dq, (jnp.zeros(k_blk.shape, k_blk.dtype), jnp.zeros(v_blk.shape, v_blk.dtype), db)

    def maybe(dq, xs):
        return lax.cond(_block_needed(q_pos, xs[-1], cfg), step, skip, dq, xs)

    dq, (dk, dv, db) = lax.scan(maybe, jnp.zeros(q5.shape, jnp.float32),
                                (kb, vb, bb, mb, jnp.arange(kb.shape[0])))
    return dq.astype(q5.dtype), dk, dv, db, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q5, kb, vb, bb, mb, q_pos):
    return _flash_fwd(cfg, q5, kb, vb, bb, mb, q_pos)[0]


_flash.defvjp(_flash_fwd, _flash_bwd)


def _chunked(q, k, v, bias, mask, is_causal, window, scale, block_size, q_block_size=None):
    """Online softmax over key blocks of `block_size`; with q_block_size, also one query block at
    a time (lax.map), so each block's logits [B, K, G, q_block, block] stay in cache (CPU)."""
    (B, T, N, D), (_, S, K, _) = q.shape, k.shape
    G = N // K
    blk = min(block_size, S)
    nb = -(-S // blk)
    pad = nb * blk - S
    tq = T if not q_block_size or q_block_size >= T else q_block_size
    nq = -(-T // tq)
    qpad = nq * tq - T

    def kv_blocks(x):  # [B, S, K, D] -> [nb, B, blk, K, D]
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return jnp.moveaxis(x.reshape(B, nb, blk, K, D), 1, 0)

    def logit_blocks(x, fill):  # [B|1, N|1, T|1, S|1] -> [nq, nb, B|1, K|1, G|1, tq|1, blk]
        x = jnp.broadcast_to(x, x.shape[:3] + (S,))
        Tx = x.shape[2]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, qpad if Tx > 1 else 0), (0, pad)), constant_values=fill)
        Kb, Gb = (K, G) if x.shape[1] == N else (1, 1)
        x = x.reshape(x.shape[0], Kb, Gb, nq if Tx > 1 else 1, tq if Tx > 1 else 1, nb, blk)
        x = jnp.moveaxis(jnp.moveaxis(x, 5, 0), 4, 0)  # [nq|1, nb, B, Kb, Gb, tq|1, blk]
        return jnp.broadcast_to(x, (nq,) + x.shape[1:])

    bb = None if bias is None else logit_blocks(bias, 0)
    mb = None if mask is None else logit_blocks(mask, False)
    cfg = (float(scale), bool(is_causal), window, S, blk)
    kb, vb = kv_blocks(k), kv_blocks(v)
    q5 = jnp.pad(q, ((0, 0), (0, qpad), (0, 0), (0, 0))).reshape(B, nq, tq, K, G, D)
    if nq == 1:
        out5 = _flash(cfg, q5[:, 0], kb, vb, None if bb is None else bb[0], None if mb is None else mb[0],
                      jnp.arange(T))
        return out5.reshape(B, T, N, D)

    def one(xs):
        q_blk, b_q, m_q, i = xs
        return _flash(cfg, q_blk, kb, vb, b_q, m_q, i * tq + jnp.arange(tq))

    out = lax.map(one, (jnp.moveaxis(q5, 1, 0), bb, mb, jnp.arange(nq)))  # [nq, B, tq, K, G, D]
    return jnp.moveaxis(out, 0, 1).reshape(B, nq * tq, N, D)[:, :T]


# --------------------------------------------------------------------------------------- blocked
# One kv head (with its G query heads) per lax.fori_loop step. Its queries are the rows
# r = t * G + g of a [T * G, D] matrix, cut into tiles of tq query positions (tq * G rows) by tk
# keys. The tiles some query sees are listed when tracing (causal / window tiles nobody sees are
# left out), and
# lax.scan walks them one at a time: two plain 2D matmuls with the softmax between them, added
# into the rows' output. Fully visible tiles get no mask; tiles on the mask's edge (or over
# padding) pay for a `where` built from iotas, fused into the exponential.
#
# Why one tile per scan step, not an unrolled plan of blocks (this implementation until
# 2026-11-26): XLA's CPU runtime runs independent ops concurrently, one thread each, in whatever
# order they become ready. Unrolled, a head's blocks ran as all logit matmuls, then all
# exponentials, then all value matmuls: 16 logit blocks of 4 MiB alive at once (out of cache) and
# each matmul on one core, with one core idle whenever the other ran the only ready op (jax.profiler
# trace, S4096 full: ~40% of the forward). Walked one tile per step, every op is alone, so each
# matmul and exponential splits across both cores (a [512, 64] x [64, 2048] logit matmul: 0.9 ms
# vs ~2 ms on one core) and the tile stays in cache.


class _Tiles(NamedTuple):
    tq: int       # query positions per big tile (tq * G rows); q is padded to whole big tiles
    tk: int       # keys per big tile; k and v are padded to whole big tiles
    groups: tuple  # ((rows, keys, edge, ((t0, k0), ...)), ...): tiles of one size and kind


class _BlockedCfg(NamedTuple):
    is_causal: bool
    window: tuple | None
    T: int
    S: int
    G: int
    fwd: _Tiles
    bwd: _Tiles


def _offsets(is_causal, window):
    """The query-minus-key offsets d = t - j visible: [lo, hi] (inclusive; +-inf when open)."""
    lo, hi = -np.inf, np.inf
    if window is not None:
        lo, hi = -window[1], window[0]
    if is_causal:
        lo = max(lo, 0)
    return lo, hi


def _tiles(T, S, big, small, is_causal, window) -> _Tiles:
    """The tiles with a visible key: big (tq, tk) tiles that every query sees whole, and where a
    big tile is only partly visible (the causal diagonal, a window's edges) or runs past S, its
    small (sq, sk) tiles, unmasked or, on the edge, masked. Padded keys are masked, padded
    queries dropped. A tile's offsets t - j run over one interval, so whether it sees some /
    every key is O(1)."""
    sq, sk = min(small[0], T), min(small[1], S)
    tq, tk = sq * max(1, min(big[0], T) // sq), sk * max(1, min(big[1], S) // sk)
    d_lo, d_hi = _offsets(is_causal, window)

    def status(t0, k0, rows, keys):  # 0: no key visible, 1: some, 2: all (and no padding)
        a, b, lo, hi = t0, min(T, t0 + rows) - 1, k0, min(S, k0 + keys) - 1
        if a - hi > d_hi or b - lo < d_lo:
            return 0
        return 2 if d_lo <= a - hi and b - lo <= d_hi and hi - lo + 1 == keys else 1

    big_full, small_full, small_edge = [], [], []
    for t0 in range(0, T, tq):
        for k0 in range(0, S, tk):
            st = status(t0, k0, tq, tk)
            if st == 2:
                big_full.append((t0, k0))
            elif st == 1:
                for t1 in range(t0, min(T, t0 + tq), sq):
                    for k1 in range(k0, min(S, k0 + tk), sk):
                        st = status(t1, k1, sq, sk)
                        if st:
                            (small_full if st == 2 else small_edge).append((t1, k1))
    groups = ((tq, tk, False, big_full), (sq, sk, False, small_full), (sq, sk, True, small_edge))
    return _Tiles(tq, tk, tuple((r, c, e, tuple(ij)) for r, c, e, ij in groups if ij))


def _tile_visible(cfg, t0, k0, rows, keys, transposed=False):
    """[rows * G, keys] bool ([keys, rows * G] if transposed): what the query rows of the tile at
    (t0, k0) (traced offsets) see of its keys: the causal / window rules and the padding."""
    n = rows * cfg.G
    shape, (r_ax, j_ax) = ((keys, n), (1, 0)) if transposed else ((n, keys), (0, 1))
    t = t0 + lax.broadcasted_iota(jnp.int32, shape, r_ax) // cfg.G
    j = k0 + lax.broadcasted_iota(jnp.int32, shape, j_ax)
    ok = j < cfg.S
    if cfg.is_causal:
        ok &= j <= t
    if cfg.window is not None:
        ok &= (t - j <= cfg.window[0]) & (j - t <= cfg.window[1])
    return ok


# A group of tiles covering at most this many (query, key) pairs per head is unrolled rather than
# walked: there the tiles are few and small (S1024 causal: three 512 x 512 forward tiles, ten
# 256 x 256 backward ones), a matmul split across both cores costs more in fork/join than it
# gains, and independent tiles running one per core win (interleaved A/B, S1024 causal: forward
# 22 vs 27 ms, fwd+bwd 78 vs 106 ms; S4096 unchanged).
BLOCKED_UNROLL_AREA = 2 ** 20


def _scan_tiles(tiles, step, carry):
    """carry = step(carry, t0, k0, rows, keys, edge) over each group of tiles, one per scan step
    (unrolled when the group is small: BLOCKED_UNROLL_AREA)."""
    for rows, keys, edge, offsets in tiles.groups:
        body = lambda c, x, r=rows, k=keys, e=edge: (step(c, x[0], x[1], r, k, e), None)
        unroll = rows * keys * len(offsets) <= BLOCKED_UNROLL_AREA  # few small tiles: see above
        carry = lax.scan(body, carry, jnp.asarray(offsets, jnp.int32), unroll=unroll)[0]
    return carry


def _pad_rows(x, n, fill=0.0):
    """x [R, ...] padded with `fill` to n rows."""
    if x.shape[0] == n:
        return x
    return jnp.concatenate([x, jnp.full((n - x.shape[0],) + x.shape[1:], fill, x.dtype)])


def _rows(x, r0, n, axis=0):
    """x's n rows (columns with axis=1) from r0 (traced)."""
    return lax.dynamic_slice_in_dim(x, r0, n, axis)


def _add_rows(acc, r0, x, axis=0):
    """acc with x added into its rows (columns with axis=1) from r0, in place."""
    return lax.dynamic_update_slice_in_dim(acc, _rows(acc, r0, x.shape[axis], axis) + x, r0, axis)


def _padded(cfg, tiles, q, k, v):
    """q [T * G, D] -> [Tp * G, D] and k, v [S, D] -> [Sp, D], whole tiles."""
    Tp, Sp = -(-cfg.T // tiles.tq) * tiles.tq, -(-cfg.S // tiles.tk) * tiles.tk
    return _pad_rows(q, Tp * cfg.G), _pad_rows(k, Sp), _pad_rows(v, Sp)


# The forward's normaliser. Softmax subtracts some m_i from row i's logits before exp; the row max
# costs one more pass over every tile, and per-tile maxima cost a rescale to combine. Instead one
# m_i per row for all tiles (so the tiles just add up, in any order), from a bound that costs
# O(T D): every logit is <= U_i = |q_i| max_j |k_j| (Cauchy-Schwarz), and m_i = U_i - BOUND_HEADROOM.
# Every term exp(s - m) is then at most e^60 (their sum over S < 2^40 keys cannot overflow), and the
# largest is >= 1 unless U_i overshoots the row's max by more than the headroom (random inputs: by
# ~10 nats; the zoo's trained byte GPT: by up to 69, in its first layer). Where a row's sum
# l = sum_j exp(s_ij - m_i) falls under BOUND_MIN_SUM (an overshoot past ~100), terms far below the
# row's max could drop into float32's subnormals, so that head is computed again with the exact
# row max, from one more pass of logit matmuls (lax.cond: only then; also where the head's output
# is not finite). Above it the largest term is >= BOUND_MIN_SUM / S >= 2^-84, and terms that
# underflow weigh < 2^-42 of it.
BOUND_HEADROOM = 60.0
BOUND_MIN_SUM = 2.0 ** -60


def _blocked_sums(cfg, q, k, v, m):
    """Per row of the padded q: o = sum_j exp(s_ij - m_i) v_j and l = sum_j exp(s_ij - m_i)."""
    f32 = jnp.float32

    def step(carry, t0, k0, rows, keys, edge):
        o, l = carry
        r0, n = t0 * cfg.G, rows * cfg.G
        s = jnp.dot(_rows(q, r0, n), _rows(k, k0, keys).T, preferred_element_type=f32)
        s = s - _rows(m, r0, n)[:, None]
        if edge:  # masked before exp, in the same fusion as exp: one pass over the tile
            s = jnp.where(_tile_visible(cfg, t0, k0, rows, keys), s, -jnp.inf)
        e = jnp.exp(s)
        o = _add_rows(o, r0, jnp.dot(e.astype(v.dtype), _rows(v, k0, keys), preferred_element_type=f32))
        # the row sums as a matrix-vector product: XLA's CPU reduce of a [rows, keys] block
        # is a tree of reduce-windows, ~2.5x the time of this dot (jax.profiler, S4096)
        return o, _add_rows(l, r0, jnp.dot(e, jnp.ones((keys,), f32), preferred_element_type=f32))

    R = q.shape[0]
    return _scan_tiles(cfg.fwd, step, (jnp.zeros((R, q.shape[1]), f32), jnp.zeros((R,), f32)))


def _blocked_row_max(cfg, q, k):
    """Per row of the padded q: the max visible logit (-inf where none)."""
    f32 = jnp.float32

    def step(mx, t0, k0, rows, keys, edge):
        r0, n = t0 * cfg.G, rows * cfg.G
        s = jnp.dot(_rows(q, r0, n), _rows(k, k0, keys).T, preferred_element_type=f32)
        if edge:
            s = jnp.where(_tile_visible(cfg, t0, k0, rows, keys), s, -jnp.inf)
        return lax.dynamic_update_slice_in_dim(mx, jnp.maximum(_rows(mx, r0, n), s.max(-1)), r0, 0)

    return _scan_tiles(cfg.fwd, step, jnp.full((q.shape[0],), -jnp.inf, f32))


def _rows_seen(cfg, n_rows):
    """Static [n_rows] bool: the real rows (t < T) that see some key (keys t - d_hi..t - d_lo)."""
    d_lo, d_hi = _offsets(cfg.is_causal, cfg.window)
    t = np.arange(cfg.T)
    seen = np.repeat((np.maximum(t - d_hi, 0) <= np.minimum(t - d_lo, cfg.S - 1)), cfg.G)
    return np.pad(seen, (0, n_rows - seen.size))


def _blocked_fwd_head(cfg, q_RxD, k_SxD, v_SxD):
    """o [T * G, D] and the rows' logsumexp (+inf where a row sees no key), bound-normalised (see
    BOUND_HEADROOM) or, where the bound is too loose for a row, with the exact row max."""
    f32, R = jnp.float32, q_RxD.shape[0]
    q, k, v = _padded(cfg, cfg.fwd, q_RxD, k_SxD, v_SxD)
    k_max = jnp.sqrt(jnp.max(jnp.sum(jnp.square(k_SxD.astype(f32)), -1)))
    m = jnp.sqrt(jnp.sum(jnp.square(q.astype(f32)), -1)) * k_max - BOUND_HEADROOM
    o, l = _blocked_sums(cfg, q, k, v, m)
    l_min = jnp.min(jnp.where(_rows_seen(cfg, q.shape[0]), l, jnp.inf))
    ok = (l_min >= BOUND_MIN_SUM) & jnp.isfinite(jnp.sum(o))

    def exact(_):
        mx = _blocked_row_max(cfg, q, k)
        m = jnp.where(jnp.isfinite(mx), mx, 0.0)
        return _blocked_sums(cfg, q, k, v, m) + (m,)

    o, l, m = lax.cond(ok, lambda _: (o, l, m), exact, None)
    o, l, m = o[:R], l[:R], m[:R]
    safe = jnp.where(l > 0, l, 1.0)
    return o / safe[:, None], jnp.where(l > 0, m + jnp.log(safe), jnp.inf), l_min


def _blocked_bwd_head(cfg, q_RxD, k_SxD, v_SxD, o_RxD, lse_R, do_RxD):
    """FlashAttention's backward per tile from the saved logsumexp, in the transposed frame
    ([keys, rows]), with q, do and k also held transposed ([D, rows], [D, keys]) and dq
    accumulated as dq^T, so that all five matmuls are plain [m, k] x [k, n] products: XLA's CPU
    runtime hands a dot with a transposed left operand to Eigen, not YNNPACK, and the head's
    fwd+bwd ran ~10% slower with dq's dot that way (S4096, interleaved A/B)."""
    tiles, f32, R = cfg.bwd, jnp.float32, q_RxD.shape[0]
    q, k, v = _padded(cfg, tiles, q_RxD, k_SxD, v_SxD)
    Rp = q.shape[0]
    do = _pad_rows(do_RxD, Rp)
    lse = _pad_rows(lse_R, Rp, jnp.inf)  # padded rows: exp(s - inf) = 0, no gradient
    delta = _pad_rows(jnp.sum(do_RxD.astype(f32) * o_RxD.astype(f32), -1), Rp)

    qT, doT, kT = q.T, do.T, k.T

    def step(carry, t0, k0, rows, keys, edge):
        dqT, dk, dv = carry
        r0, n = t0 * cfg.G, rows * cfg.G
        k_b, v_b = _rows(k, k0, keys), _rows(v, k0, keys)
        sT = jnp.dot(k_b, _rows(qT, r0, n, 1), preferred_element_type=f32) - _rows(lse, r0, n)[None]
        if edge:  # masked before exp, in the same fusion as exp (as in the forward)
            sT = jnp.where(_tile_visible(cfg, t0, k0, rows, keys, transposed=True), sT, -jnp.inf)
        pT = jnp.exp(sT)
        dv = _add_rows(dv, k0, jnp.dot(pT.astype(do.dtype), _rows(do, r0, n), preferred_element_type=f32))
        dpT = jnp.dot(v_b, _rows(doT, r0, n, 1), preferred_element_type=f32)
        dsT = pT * (dpT - _rows(delta, r0, n)[None])
        dk = _add_rows(dk, k0, jnp.dot(dsT.astype(q.dtype), _rows(q, r0, n), preferred_element_type=f32))
        dq_b = jnp.dot(_rows(kT, k0, keys, 1), dsT.astype(k.dtype), preferred_element_type=f32)
        dqT = _add_rows(dqT, r0, dq_b, 1)
        return dqT, dk, dv

    zeros = lambda x: jnp.zeros(x.shape, f32)
    dqT, dk, dv = _scan_tiles(tiles, step, (zeros(qT), zeros(k), zeros(v)))
    return dqT.T[:R], dk[:cfg.S], dv[:cfg.S]


# The heads are walked in the inputs' own layout: each step slices its kv head's q [T, G, D] (rows
# t * G + g), k and v out of [B, T, K, G, D] / [B, S, K, D] and writes its outputs back in place,
# rather than transposing every input to head-major and back (XLA's CPU transposes of [T, K, D]:
# ~4 ms per 8 MiB array, ~10% of an S4096 forward).


def _head(x, h, K):
    """Kv head h = b * K + k of x [B, L, K, ...] -> [L * prod(...), D]."""
    start = (h // K, 0, h % K) + (0,) * (x.ndim - 3)
    sl = lax.dynamic_slice(x, start, (1, x.shape[1], 1) + x.shape[3:])
    return sl.reshape(-1, x.shape[-1])


def _put_head(acc, h, K, x):
    start = (h // K, 0, h % K) + (0,) * (acc.ndim - 3)
    return lax.dynamic_update_slice(acc, x.reshape((1, acc.shape[1], 1) + acc.shape[3:]).astype(acc.dtype), start)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_heads(cfg, q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD):
    return _blocked_heads_fwd(cfg, q_BxTxKxGxD, k_BxSxKxD, v_BxSxKxD)[0]


def _blocked_heads_fwd(cfg, q, k, v):
    B, _, K = k.shape[:3]

    def head(h, carry):
        o, lse = carry
        o_h, lse_h, _ = _blocked_fwd_head(cfg, _head(q, h, K), _head(k, h, K), _head(v, h, K))
        return _put_head(o, h, K, o_h), lax.dynamic_update_index_in_dim(lse, lse_h, h, 0)

    init = (jnp.zeros(q.shape, q.dtype), jnp.zeros((B * K, cfg.T * cfg.G), jnp.float32))
    o, lse = lax.fori_loop(0, B * K, head, init)
    return o, (q, k, v, o, lse)


def _blocked_heads_bwd(cfg, res, do):
    q, k, v, o, lse = res
    K = k.shape[2]

    def head(h, grads):
        g = _blocked_bwd_head(cfg, _head(q, h, K), _head(k, h, K), _head(v, h, K), _head(o, h, K),
                              lse[h], _head(do, h, K))
        return tuple(_put_head(acc, h, K, x) for acc, x in zip(grads, g))

    return lax.fori_loop(0, k.shape[0] * K, head, tuple(jnp.zeros(x.shape, x.dtype) for x in (q, k, v)))


_blocked_heads.defvjp(_blocked_heads_fwd, _blocked_heads_bwd)

# (query, key) tile sizes of "blocked" when not given, big (whole visible tiles) and small (where a
# big tile is partly visible), measured on 2 CPU cores against PyTorch's SDPA in the same process
# (B1 N8 D64 f32, benchmarks/results/README.md): forward S4096 causal 0.80x with these, 0.70x with
# one size of 512 x 512, 0.53x with (512, 2048) / (256, 256); backward S4096 causal 0.89x with
# small (256, 512), 0.82x with (256, 256). q_block_size / block_size set both.
BLOCKED_FWD = ((1024, 1024), (512, 512))
BLOCKED_BWD = ((512, 1024), (256, 512))


def _blocked_cfg(T, S, G, is_causal, window, q_block_size=None, block_size=None) -> _BlockedCfg:
    def tiles(big, small):
        if q_block_size or block_size:
            big = small = (q_block_size or big[0], block_size or big[1])
        return _tiles(T, S, big, small, is_causal, window)

    return _BlockedCfg(is_causal, window, T, S, G, tiles(*BLOCKED_FWD), tiles(*BLOCKED_BWD))


def _blocked(q, k, v, is_causal, window, scale, q_block_size=None, block_size=None):
    (B, T, N, D), (S, K) = q.shape, k.shape[1:3]
    G = N // K
    cfg = _blocked_cfg(T, S, G, is_causal, window, q_block_size, block_size)
    o = _blocked_heads(cfg, (q * jnp.asarray(scale, q.dtype)).reshape(B, T, K, G, D), k, v)
    return o.reshape(B, T, N, D)


# ---------------------------------------------------------------------------------- native (CPU)
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


def _native_applies(q) -> bool:
    return q.shape[-1] % native.HEAD_DIM_MULTIPLE == 0


def _native(q, k, v, bias, mask, is_causal, window, scale, q_block_size=None, block_size=None):
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


def _auto(q, k, bias, mask, is_causal, window):
    """cuDNN where it applies; on CPU the C++ kernel ("native") where it applies and builds, else
    "blocked" (or "chunked" with query blocks when there is a bias or mask) once the logits
    outgrow the caches; else "xla", or "chunked" once the full logits would be huge."""
    if _cudnn_applies(q, k):
        return "cudnn"
    B, T, N, _ = q.shape
    S = k.shape[1]
    if jax.default_backend() == "cpu" and T * S >= CPU_NATIVE_MIN_LOGITS and _native_applies(q) and native.available():
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
    (auto: cuDNN on GPU for fp16/bf16; on CPU "native", a C++ FlashAttention kernel built on first
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
    bias, mask, window = _check(q, k, v, bias, mask, window)
    for name, size in (("block_size", block_size), ("q_block_size", q_block_size)):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{name} must be a positive int; got {size!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    impl = implementation or _auto(q, k, bias, mask, is_causal, window)
    if impl == "per-example-cpu":
        return _per_example(q, k, v, scale)
    if impl == "chunked-cpu":
        return _chunked(q, k, v, bias, mask, is_causal, window, scale, CPU_BLOCKS[1], CPU_BLOCKS[0])
    if impl == "blocked":
        if bias is not None or mask is not None:
            raise ValueError('implementation "blocked" takes is_causal and window only, not bias or '
                             'mask; use "chunked" (or None) for those')
        sizes = (q_block_size, block_size) if implementation else (None, None)  # auto: measured sizes
        return _blocked(q, k, v, is_causal, window, scale, *sizes)
    if impl == "native":
        if not _native_applies(q):
            raise ValueError(f'implementation "native" needs a head dim that is a multiple of '
                             f'{native.HEAD_DIM_MULTIPLE}; got {q.shape[-1]}; use None (auto) for others')
        if not native.available():
            raise RuntimeError(f'implementation "native" is not available here: {native.unavailable_reason()}')
        sizes = (q_block_size, block_size) if implementation else (None, None)  # auto: measured sizes
        return _native(q, k, v, bias, mask, is_causal, window, scale, *sizes)
    if impl == "reference":
        return _reference(q, k, v, bias, mask, is_causal, window, scale)
    if impl == "chunked":
        return _chunked(q, k, v, bias, mask, is_causal, window, scale, block_size or 512, q_block_size)
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


# --------------------------------------------------------------------------------- RNN attention


def _attend(scores_BxS, keys_BxSxH, mask):
    """Softmax the scores over visible keys and average the keys: (context [B, H], weights [B, S])."""
    valid = jnp.ones(scores_BxS.shape, bool) if mask is None else jnp.asarray(mask, bool)
    weights_BxS = _masked_softmax(scores_BxS.astype(jnp.float32), valid)
    context = jnp.einsum("bs,bsh->bh", weights_BxS, keys_BxSxH.astype(jnp.float32))
    return context.astype(keys_BxSxH.dtype), weights_BxS


def additive_attention(query_BxH, keys_BxSxH, W_q, W_k, v_a, *, mask=None):
    """Bahdanau attention: score_s = v_a . tanh(query W_q + key_s W_k); W_q [Hq, A], W_k [Hk, A], v_a [A].

    mask [B, S] bool, True = attend; a row with no visible key gets zero weights and context.
    """
    if query_BxH.ndim != 2 or keys_BxSxH.ndim != 3 or W_q.shape != (query_BxH.shape[1], v_a.shape[0]) \
            or W_k.shape != (keys_BxSxH.shape[2], v_a.shape[0]):
        raise ValueError(f"additive_attention wants query [B, Hq], keys [B, S, Hk], W_q [Hq, A], "
                         f"W_k [Hk, A], v_a [A]; got {query_BxH.shape}, {keys_BxSxH.shape}, "
                         f"{W_q.shape}, {W_k.shape}, {v_a.shape}")
    hidden_BxSxA = jnp.tanh((query_BxH @ W_q)[:, None, :] + keys_BxSxH @ W_k)
    return _attend(hidden_BxSxA @ v_a, keys_BxSxH, mask)


def multiplicative_attention(query_BxH, keys_BxSxH, W=None, *, mask=None):
    """Luong attention: score_s = query . W key_s ("general", W [Hq, Hk]) or query . key_s (W=None, "dot")."""
    Hk = keys_BxSxH.shape[-1]
    want = (query_BxH.shape[-1], Hk) if W is not None else None
    if query_BxH.ndim != 2 or keys_BxSxH.ndim != 3 or (W is None and query_BxH.shape[-1] != Hk) \
            or (W is not None and W.shape != want):
        raise ValueError(f"multiplicative_attention wants query [B, Hq], keys [B, S, Hk], W [Hq, Hk] "
                         f"(or W=None with Hq == Hk); got {query_BxH.shape}, {keys_BxSxH.shape}, "
                         f"{None if W is None else W.shape}")
    projected_BxHk = query_BxH if W is None else query_BxH @ W
    return _attend(jnp.einsum("bh,bsh->bs", projected_BxHk, keys_BxSxH), keys_BxSxH, mask)
