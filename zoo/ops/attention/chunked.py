"""zoo.ops.attention's "chunked" implementation: online softmax over key blocks in lax.scan (Rabe &
Staats 2021, "Self-attention does not need O(n^2) memory"; Dao et al. 2022, FlashAttention, Alg. 1),
with a custom_vjp backward that recomputes each block from the saved logsumexp (Dao et al. 2022,
Alg. 2 / appendix B.2): memory O(T * block) instead of O(T * S), forward and backward. Any backend,
bias and mask included; with query blocks (lax.map) each block's logits stay in a CPU's cache.

Shape letters: B batch, T query length, S key length, N query heads, K kv heads (N % K == 0),
G = N // K query heads per kv head, D head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from zoo.ops.attention.masks import structural_mask

# Layout inside: q [B, T, K, G, D]; keys in blocks [nb, B, blk, K, D]; bias/mask in blocks
# [nb, B|1, K|1, G|1, T|1, blk]. Padding, broadcasting and head grouping happen outside the
# custom_vjp, so autodiff reduces the gradients of those reshapes for us.


def _block_valid(q_pos, j, cfg):
    """[T, blk] bool: the causal/window/padding rules for key block j and query positions q_pos."""
    _, is_causal, window, S, blk = cfg
    k_pos = j * blk + jnp.arange(blk)
    return structural_mask(q_pos, k_pos, is_causal, window) & (k_pos < S)


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


def chunked(q, k, v, bias, mask, is_causal, window, scale, block_size, q_block_size=None):
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

