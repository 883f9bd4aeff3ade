"""Attention as pure functions: scaled dot-product (six implementations), KV-cache decoding, and
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
  "blocked"    the CPU path (no bias or mask): one kv head per lax.map step, a static plan of
               (query block, key block) pairs, each two 2D matmuls with the softmax between them
               (causal / window blocks nobody sees are left out, fully visible ones go unmasked;
               one normaliser per row from a Cauchy-Schwarz bound, so the blocks just add up),
               and FlashAttention's backward per block from the saved logsumexp, in the
               transposed frame. XLA's CPU dots reach ~2x the throughput on these 2D shapes that
               they do on "xla"'s batched [B, N, T, S] einsums, and each block stays in cache.

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

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "chunked", "blocked")


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
# One kv head (with its G query heads) per lax.map step; inside it a static plan of (query block,
# key block) pairs, each two plain 2D matmuls with the softmax between them. Causal / window masks
# are resolved when tracing: key blocks no query of a block sees are left out, blocks every query
# sees get no mask, and only the blocks on the mask's edge pay for a `where`.


def _visible(a, b, lo, hi, is_causal, window, xp=np):
    """[b - a, hi - lo] bool: which keys lo..hi-1 the queries a..b-1 see (top-left alignment)."""
    d = xp.arange(a, b)[:, None] - xp.arange(lo, hi)[None, :]
    ok = xp.ones(d.shape, bool)
    if is_causal:
        ok &= d >= 0
    if window is not None:
        ok &= (d <= window[0]) & (-d <= window[1])
    return ok


def _plan(T, S, tq, tk, is_causal, window):
    """Per query block [a, b): key blocks (lo, hi, masked) covering the keys some query of the
    block sees, cut where the mask's status changes (every query sees the key / some do) and at tk."""
    plan = []
    for a in range(0, T, tq):
        b = min(T, a + tq)
        ok = _visible(a, b, 0, S, is_causal, window)
        status = np.where(ok.all(0), 2, np.where(ok.any(0), 1, 0))
        cuts = np.flatnonzero(np.diff(status)) + 1
        kbs = []
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, S]):
            for l0 in range(int(lo), int(hi), tk):
                if status[lo]:
                    kbs.append((l0, min(int(hi), l0 + tk), bool(status[lo] == 1)))
        plan.append((a, b, tuple(kbs)))
    return tuple(plan)


def _block_mask(a, b, lo, hi, G, is_causal, window):
    return jnp.tile(_visible(a, b, lo, hi, is_causal, window, jnp), (G, 1))  # rows (g, t)


# The forward's normaliser. Softmax subtracts some m_i from row i's logits before exp; the row max
# costs one more pass over every [rows, keys] block, and per-block maxima cost a rescale to combine.
# Instead one m_i per row for all key blocks (so the blocks just add up), from a bound that costs
# O(T D): every logit is <= U_i = |q_i| max_j |k_j| (Cauchy-Schwarz), and m_i = U_i - BOUND_HEADROOM.
# Every term exp(s - m) is then at most e^60 (their sum over S < 2^40 keys cannot overflow), and the
# largest is >= 1 unless U_i overshoots the row's max by more than the headroom (random inputs: by
# ~10 nats; the zoo's trained byte GPT: by up to 69, in its first layer). Where a row's sum
# l = sum_j exp(s_ij - m_i) falls under BOUND_MIN_SUM (an overshoot past ~100), terms far below the
# row's max could drop into float32's subnormals, so that head is computed again with the exact
# per-block max (lax.cond: only then; also where the head's output is not finite). Above it the
# largest term is >= BOUND_MIN_SUM / S >= 2^-84, and terms that underflow weigh < 2^-42 of it.
BOUND_HEADROOM = 60.0
BOUND_MIN_SUM = 2.0 ** -60


def _blocked_fwd_head(cfg, q_GxTxD, k_SxD, v_SxD):
    """Bound-normalised blocks (see BOUND_MIN_SUM), or the exact per-block max where the bound is
    too loose for a row."""
    o, lse, l_min = _blocked_fwd_head_bound(cfg, q_GxTxD, k_SxD, v_SxD)
    ok = (l_min >= BOUND_MIN_SUM) & jnp.isfinite(jnp.sum(o))
    return lax.cond(ok, lambda *_: (o, lse),
                    functools.partial(_blocked_fwd_head_exact, cfg), q_GxTxD, k_SxD, v_SxD)


def _blocked_fwd_head_bound(cfg, q_GxTxD, k_SxD, v_SxD):
    """Every block normalised by one m_i per row (see BOUND_HEADROOM); also the smallest row sum of
    the rows that see some key (+inf when none does)."""
    is_causal, window, plan, _ = cfg
    G, _, D = q_GxTxD.shape
    S = k_SxD.shape[0]
    f32 = jnp.float32
    k_max = jnp.sqrt(jnp.max(jnp.sum(jnp.square(k_SxD.astype(f32)), -1)))
    outs, lses, l_min = [], [], jnp.asarray(jnp.inf, f32)
    for a, b, kbs in plan:
        n = G * (b - a)
        if not kbs:
            outs.append(jnp.zeros((G, b - a, D), f32))
            lses.append(jnp.full((G, b - a), jnp.inf))  # exp(s - inf) = 0: no gradient either
            continue
        q_nxD = q_GxTxD[:, a:b].reshape(n, D)
        upper = jnp.sqrt(jnp.sum(jnp.square(q_nxD.astype(f32)), -1)) * k_max
        m = upper - BOUND_HEADROOM
        o = l = 0.0
        for lo, hi, masked in kbs:
            e = jnp.exp(jnp.dot(q_nxD, k_SxD[lo:hi].T, preferred_element_type=f32) - m[:, None])
            if masked:
                e = jnp.where(_block_mask(a, b, lo, hi, G, is_causal, window), e, 0.0)
            o = o + jnp.dot(e.astype(v_SxD.dtype), v_SxD[lo:hi], preferred_element_type=f32)
            # the row sums as a matrix-vector product: XLA's CPU reduce of a [rows, keys] block
            # is a tree of reduce-windows, ~2.5x the time of this dot (jax.profiler, S4096)
            l = l + jnp.dot(e, jnp.ones((hi - lo,), f32), preferred_element_type=f32)
        seen = np.tile(_visible(a, b, 0, S, is_causal, window).any(1), G)  # static: rows with keys
        l_min = jnp.minimum(l_min, jnp.min(jnp.where(seen, l, jnp.inf)))
        safe = jnp.where(l > 0, l, 1.0)
        outs.append((o / safe[:, None]).reshape(G, b - a, D))
        lses.append(jnp.where(l > 0, m + jnp.log(safe), jnp.inf).reshape(G, b - a))
    return jnp.concatenate(outs, 1), jnp.concatenate(lses, 1), l_min


def _blocked_fwd_head_exact(cfg, q_GxTxD, k_SxD, v_SxD):
    """Each (query block, key block) normalised by its own row max m_j, then the blocks combined
    with weights exp(m_j - max_j m_j): no running rescale, so the blocks are independent."""
    is_causal, window, plan, _ = cfg
    G, _, D = q_GxTxD.shape
    outs, lses = [], []
    for a, b, kbs in plan:
        n = G * (b - a)
        if not kbs:
            outs.append(jnp.zeros((G, b - a, D), jnp.float32))
            lses.append(jnp.full((G, b - a), jnp.inf))  # exp(s - inf) = 0: no gradient either
            continue
        q_nxD = q_GxTxD[:, a:b].reshape(n, D)
        ms, ls, pvs = [], [], []
        for lo, hi, masked in kbs:
            s = jnp.dot(q_nxD, k_SxD[lo:hi].T, preferred_element_type=jnp.float32)
            if masked:
                s = jnp.where(_block_mask(a, b, lo, hi, G, is_causal, window), s, -jnp.inf)
            m = s.max(-1)
            e = jnp.exp(s - (jnp.where(jnp.isfinite(m), m, 0.0) if masked else m)[:, None])
            ms.append(m)
            ls.append(e.sum(-1))
            pvs.append(jnp.dot(e.astype(v_SxD.dtype), v_SxD[lo:hi], preferred_element_type=jnp.float32))
        M = functools.reduce(jnp.maximum, ms)
        M = jnp.where(jnp.isfinite(M), M, 0.0)
        w = [jnp.exp(m - M) for m in ms] if len(kbs) > 1 else [None]
        o = pvs[0] if w[0] is None else sum(wj[:, None] * pv for wj, pv in zip(w, pvs))
        l = ls[0] if w[0] is None else sum(wj * lj for wj, lj in zip(w, ls))
        seen = l > 0
        l = jnp.where(seen, l, 1.0)
        outs.append((o / l[:, None]).reshape(G, b - a, D))
        lses.append(jnp.where(seen, M + jnp.log(l), jnp.inf).reshape(G, b - a))
    return jnp.concatenate(outs, 1), jnp.concatenate(lses, 1)


def _blocked_bwd_head(cfg, q_GxTxD, k_SxD, v_SxD, o_GxTxD, lse_GxT, do_GxTxD):
    """FlashAttention's backward per block, in the transposed frame ([keys, rows]), so dk and dv
    are plain matmuls and only dq's needs a transposed operand."""
    is_causal, window, _, plan = cfg
    G, _, D = q_GxTxD.shape
    f32 = jnp.float32
    delta_GxT = jnp.sum(do_GxTxD.astype(f32) * o_GxTxD.astype(f32), -1)
    dk, dv, dqs = jnp.zeros(k_SxD.shape, f32), jnp.zeros(v_SxD.shape, f32), []
    for a, b, kbs in plan:
        n = G * (b - a)
        q_nxD, do_nxD = q_GxTxD[:, a:b].reshape(n, D), do_GxTxD[:, a:b].reshape(n, D)
        lse, delta = lse_GxT[:, a:b].reshape(n), delta_GxT[:, a:b].reshape(n)
        dq = jnp.zeros((n, D), f32)
        for lo, hi, masked in kbs:
            k_blk, v_blk = k_SxD[lo:hi], v_SxD[lo:hi]
            pT = jnp.exp(jnp.dot(k_blk, q_nxD.T, preferred_element_type=f32) - lse[None])
            if masked:
                pT = jnp.where(_block_mask(a, b, lo, hi, G, is_causal, window).T, pT, 0.0)
            dv = dv.at[lo:hi].add(jnp.dot(pT.astype(do_nxD.dtype), do_nxD, preferred_element_type=f32))
            dsT = pT * (jnp.dot(v_blk, do_nxD.T, preferred_element_type=f32) - delta[None])
            dk = dk.at[lo:hi].add(jnp.dot(dsT.astype(q_nxD.dtype), q_nxD, preferred_element_type=f32))
            dq = dq + jnp.dot(dsT.T.astype(k_blk.dtype), k_blk, preferred_element_type=f32)
        dqs.append(dq.reshape(G, b - a, D))
    return jnp.concatenate(dqs, 1), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_heads(cfg, q_HxGxTxD, k_HxSxD, v_HxSxD):
    return _blocked_heads_fwd(cfg, q_HxGxTxD, k_HxSxD, v_HxSxD)[0]


def _blocked_heads_fwd(cfg, q, k, v):
    o, lse = lax.map(lambda x: _blocked_fwd_head(cfg, *x), (q, k, v))
    o = o.astype(q.dtype)
    return o, (q, k, v, o, lse)


def _blocked_heads_bwd(cfg, res, do):
    q, k, v, o, lse = res
    dq, dk, dv = lax.map(lambda x: _blocked_bwd_head(cfg, *x), (q, k, v, o, lse, do))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_blocked_heads.defvjp(_blocked_heads_fwd, _blocked_heads_bwd)

# (query, key) block sizes of "blocked" when not given, measured on 2 CPU cores (zoo bench
# attention --quick): the forward wants big square blocks, the backward smaller query blocks, and a
# causal forward small query blocks (less of the diagonal is masked work); with the bound
# normaliser the full forward's best pair moved from (1024, 1024) to (512, 2048). Query blocks grow past
# T / 16 so long sequences do not unroll into hundreds of blocks.
BLOCKED_FWD, BLOCKED_FWD_CAUSAL, BLOCKED_BWD = (512, 2048), (128, 2048), (256, 1024)
BLOCKED_AUTO_MAX_BLOCKS = 128  # auto on CPU uses "blocked" while a plan has <= 128 block pairs per head


def _blocked_cfg(T, S, is_causal, window, q_block_size=None, block_size=None):
    structured = is_causal or window is not None
    fwd = BLOCKED_FWD_CAUSAL if structured else BLOCKED_FWD
    grow = lambda tq: max(tq, -(-T // 16))
    fwd_q, fwd_k = q_block_size or grow(fwd[0]), block_size or fwd[1]
    bwd_q, bwd_k = q_block_size or grow(BLOCKED_BWD[0]), block_size or BLOCKED_BWD[1]
    return (is_causal, window, _plan(T, S, min(fwd_q, T), min(fwd_k, S), is_causal, window),
            _plan(T, S, min(bwd_q, T), min(bwd_k, S), is_causal, window))


def _blocked(q, k, v, is_causal, window, scale, q_block_size=None, block_size=None):
    (B, T, N, D), (S, K) = q.shape, k.shape[1:3]
    G = N // K
    cfg = _blocked_cfg(T, S, is_causal, window, q_block_size, block_size)
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)
    kh, vh = (x.transpose(0, 2, 1, 3).reshape(B * K, S, D) for x in (k, v))
    o = _blocked_heads(cfg, qh.reshape(B * K, G, T, D), kh, vh)
    return o.reshape(B, K, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, N, D)


# ---------------------------------------------------------------------------------------- public


CPU_BLOCKS = (128, 1024)  # auto on CPU: (query block, key block) of "chunked"
CPU_NARROW_HEAD = 16      # auto on CPU: heads this narrow, unmasked, go one example at a time
CPU_NARROW_LOGITS = 2**22  # ... when one example's [N, T, S] float32 logits fit in 16 MiB


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
    """cuDNN where it applies; on CPU "blocked" (or "chunked" with query blocks when there is a
    bias or mask) once the logits outgrow the caches; else "xla", or "chunked" once the full
    logits would be huge."""
    if _cudnn_applies(q, k):
        return "cudnn"
    B, T, N, _ = q.shape
    S = k.shape[1]
    # On CPU, XLA runs each op of "xla" over the whole [B, N, T, S] logits: the matmul writes them
    # to memory and softmax's passes read them back (an elementwise pass over 32 MiB costs as much
    # as the matmul, see benchmarks/results/README.md). "blocked" runs one head at a time through
    # 2D matmuls on cache-sized blocks: 2-3x "chunked" and ~0.8x PyTorch's flash kernel at
    # B1 N8 D64 S1024-4096 f32.
    if jax.default_backend() == "cpu" and T >= 2 * CPU_BLOCKS[0] and S >= 256 and q.shape[-1] > CPU_NARROW_HEAD:
        if bias is None and mask is None and T * S <= 2**26:  # longer: too many blocks to unroll
            plans = _blocked_cfg(T, S, is_causal, window)[2:]
            if max(sum(len(kbs) for _, _, kbs in plan) for plan in plans) <= BLOCKED_AUTO_MAX_BLOCKS:
                return "blocked"
        return "chunked-cpu"
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
    (auto: cuDNN on GPU for fp16/bf16; on CPU one example at a time for unmasked heads of D <= 16,
    and when T, S >= 256 "blocked" (no bias or mask) or "chunked" with query blocks; else "xla",
    or "chunked" when the [B, N, T, S] float32 logits would pass 1 GiB). block_size: keys per
    block for "chunked" (default 512; S need not divide it) and "blocked" (default: the measured
    BLOCKED_* sizes); q_block_size: queries per block (chunked's default: all).
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
