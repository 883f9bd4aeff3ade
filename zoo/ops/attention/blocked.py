"""zoo.ops.attention's "blocked" implementation, the CPU path without bias or mask: one kv head per
loop step, its visible (query tile, key tile) pairs walked one per lax.scan step, each two 2D
matmuls with the softmax between them, one normaliser per row from a Cauchy-Schwarz bound (so the
tiles just add up), and FlashAttention's backward (Dao et al. 2022, Alg. 2) per tile from the saved
logsumexp, in the transposed frame. Why each choice: the comments below, and
benchmarks/results/README.md ("CPU attention: the tile walk").

Shape letters: B batch, T query length, S key length, N query heads, K kv heads (N % K == 0),
G = N // K query heads per kv head, D head dim.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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


def blocked(q, k, v, is_causal, window, scale, q_block_size=None, block_size=None):
    (B, T, N, D), (S, K) = q.shape, k.shape[1:3]
    G = N // K
    cfg = _blocked_cfg(T, S, G, is_causal, window, q_block_size, block_size)
    o = _blocked_heads(cfg, (q * jnp.asarray(scale, q.dtype)).reshape(B, T, K, G, D), k, v)
    return o.reshape(B, T, N, D)

