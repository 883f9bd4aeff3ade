"""zoo.ops.attention against a NumPy softmax-attention written here, plus gradient agreement."""

import concurrent.futures
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import attention as A
from zoo.ops.attention import blocked as AB
from zoo.ops import native

IMPLS = ["reference", "xla", "chunked", "chunked_q", None]  # None = auto
BLOCK = 3  # small key blocks so "chunked" scans several blocks and pads the last one


def _impl(impl):
    """"chunked_q": chunked with query blocks of 2 too (several blocks, the last one padded);
    "blocked_q": blocked with query blocks of 2 (and key blocks of BLOCK), "blocked" with its own
    default blocks (one block pair per head at these sizes)."""
    if impl == "chunked_q":
        return dict(implementation="chunked", q_block_size=2, block_size=BLOCK)
    if impl == "blocked_q":
        return dict(implementation="blocked", q_block_size=2, block_size=BLOCK)
    if impl == "blocked":
        return dict(implementation="blocked")
    return dict(implementation=impl, block_size=BLOCK)


def np_attention(q, k, v, bias=None, mask=None, is_causal=False, window=None, scale=None):
    """Float64 NumPy attention; query i aligned with key i; rows with no visible key give 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, D = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(D) if scale is None else scale
    out = np.zeros((B, T, N, D))
    mask = None if mask is None else np.broadcast_to(mask, (B, N, T, S))
    for b in range(B):
        for n in range(N):
            kv = n // (N // K)
            logits = q[b, :, n] @ k[b, :, kv].T * scale
            if bias is not None:
                logits = logits + np.broadcast_to(bias, (B, N, T, S))[b, n]
            for t in range(T):
                keys = [s for s in range(S)
                        if (not is_causal or s <= t)
                        and (window is None or t - window[0] <= s <= t + window[1])
                        and (mask is None or mask[b, n, t, s])]
                if keys:
                    w = np.exp(logits[t, keys] - logits[t, keys].max())
                    out[b, t, n] = (w / w.sum()) @ v[b, keys, kv]
    return out


def _inputs(B=2, T=5, S=7, N=4, K=2, D=8, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in ((B, T, N, D), (B, S, K, D), (B, S, K, D)))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _key_padding(B, S, lengths):
    return (np.arange(S)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]


# name -> (shape kwargs, attention kwargs built from the shapes)
CASES = {
    "plain": (dict(T=6, S=6), lambda B, T, S, N: {}),
    "causal": (dict(T=6, S=6), lambda B, T, S, N: dict(is_causal=True)),
    "window": (dict(T=7, S=7), lambda B, T, S, N: dict(window=(2, 1))),
    "causal_window": (dict(T=7, S=7), lambda B, T, S, N: dict(is_causal=True, window=(2, 0))),
    "gqa_causal": (dict(T=6, S=6, N=4, K=2), lambda B, T, S, N: dict(is_causal=True)),
    "mqa": (dict(T=6, S=6, N=4, K=1), lambda B, T, S, N: dict(is_causal=True)),
    "padding_with_empty_batch": (dict(T=4, S=7),
                                 lambda B, T, S, N: dict(mask=_key_padding(B, S, [5, 0]))),
    "bias": (dict(T=5, S=7), lambda B, T, S, N: dict(
        bias=np.random.default_rng(1).normal(size=(B, N, T, S)).astype(np.float32))),
    "bias_broadcast_mask": (dict(T=5, S=7), lambda B, T, S, N: dict(
        bias=np.random.default_rng(2).normal(size=(1, N, 1, S)).astype(np.float32),
        mask=np.random.default_rng(3).random((B, 1, T, S)) > 0.5)),
    "t_ne_s_causal": (dict(T=3, S=7), lambda B, T, S, N: dict(is_causal=True)),
    "t_gt_s_window_empty_rows": (dict(T=7, S=3), lambda B, T, S, N: dict(window=(0, 0))),
    "random_mask_empty_rows": (dict(T=5, S=6), lambda B, T, S, N: dict(
        mask=np.random.default_rng(4).random((B, N, T, S)) > 0.8, is_causal=True)),
}


def _case(name, dtype=jnp.float32):
    shape, make = CASES[name]
    q, k, v = _inputs(**shape, dtype=dtype)
    B, T, N = q.shape[:3]
    kw = make(B, T, k.shape[1], N)
    return q, k, v, {n: (jnp.asarray(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}


NO_BIAS_OR_MASK = [n for n in CASES if not {"bias", "mask"} & set(CASES[n][1](2, 6, 6, 4))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy(name, impl):
    _check_numpy(name, impl)


@pytest.mark.parametrize("impl", ["blocked", "blocked_q"])
@pytest.mark.parametrize("name", NO_BIAS_OR_MASK)
def test_blocked_matches_numpy(name, impl):
    _check_numpy(name, impl)


def _check_numpy(name, impl):
    q, k, v, kw = _case(name)
    arrays = {n: x for n, x in kw.items() if hasattr(x, "shape")}
    static = {n: x for n, x in kw.items() if n not in arrays}
    attend = jax.jit(lambda q, k, v, arrays: A.dot_product_attention(
        q, k, v, **_impl(impl), **arrays, **static))
    got = attend(q, k, v, arrays)
    want = np_attention(q, k, v, **{n: np.asarray(x) if hasattr(x, "shape") else x for n, x in kw.items()})
    assert got.shape == q.shape and np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _grads(impl, q, k, v, kw, dtype=jnp.float32):
    w = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), dtype)  # random cotangent
    has_bias = "bias" in kw

    def loss(q, k, v, bias):
        extra = dict(kw, bias=bias) if has_bias else kw
        out = A.dot_product_attention(q, k, v, **_impl(impl), **extra)
        return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32))

    grad = jax.grad(loss, argnums=(0, 1, 2, 3) if has_bias else (0, 1, 2))
    return jax.jit(grad)(q, k, v, kw.get("bias"))  # one compile beats op-by-op dispatch


@pytest.mark.parametrize("impl", ["xla", "chunked", "chunked_q"])
@pytest.mark.parametrize("name", ["causal_window", "gqa_causal", "mqa", "padding_with_empty_batch",
                                  "bias", "bias_broadcast_mask", "t_gt_s_window_empty_rows",
                                  "random_mask_empty_rows"])
def test_gradients_match_reference(name, impl):
    q, k, v, kw = _case(name)
    want = _grads("reference", q, k, v, kw)
    got = _grads(impl, q, k, v, kw)
    for g, r in zip(got, want):
        assert g.shape == r.shape and np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["blocked", "blocked_q"])
@pytest.mark.parametrize("name", NO_BIAS_OR_MASK)
def test_blocked_gradients_match_reference(name, impl):
    q, k, v, kw = _case(name)
    for g, r in zip(_grads(impl, q, k, v, kw), _grads("reference", q, k, v, kw)):
        assert g.shape == r.shape and np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,S,big,small,causal,window", [
    (9, 9, (2, 3), (2, 3), True, None), (7, 11, (3, 4), (3, 4), False, (2, 1)),
    (8, 5, (3, 2), (3, 2), True, (1, 0)), (6, 6, (4, 100), (4, 100), True, None),
    (5, 7, (5, 7), (5, 7), False, None), (12, 12, (4, 4), (4, 4), False, (0, 5)),
    (16, 16, (8, 8), (2, 2), True, None), (13, 17, (8, 8), (2, 4), False, (3, 2)),
    (16, 12, (16, 8), (4, 4), True, (6, 0)), (20, 20, (8, 8), (4, 2), False, None)])
def test_blocked_tiles_cover_exactly_the_visible_keys(T, S, big, small, causal, window):
    """Every visible (query, key) pair lies in exactly one listed tile, unmasked tiles hold only
    visible pairs and no padded keys, edge tiles are not all visible, no tile is all invisible,
    big tiles are whole multiples of the small ones, and the traced edge mask is the enumerated
    one (padded rows / keys included)."""
    visible = np.array([[(not causal or j <= i) and (window is None or i - window[0] <= j <= i + window[1])
                         for j in range(S)] for i in range(T)])
    tiles = AB._tiles(T, S, big, small, causal, window)
    G = 2
    cfg = AB._BlockedCfg(causal, window, T, S, G, tiles, tiles)
    covered = np.zeros((T, S), int)
    for rows, keys, edge, offsets in tiles.groups:
        assert tiles.tq % rows == 0 and tiles.tk % keys == 0 and rows <= max(big[0], small[0])
        for a, lo in offsets:
            block = visible[a:a + rows, lo:lo + keys]
            padded = block.shape[1] != keys  # padded keys (padded queries are dropped, not masked)
            assert block.any() and (edge or (block.all() and not padded)) and (not edge or padded or not block.all())
            covered[a:a + rows, lo:lo + keys] += 1
            if edge:  # rows (t, g) of the tile, keys lo..lo+keys-1, past T / S padded with invisible
                want = np.zeros((rows, keys), bool)
                want[:block.shape[0], :block.shape[1]] = block
                got = np.asarray(AB._tile_visible(cfg, a, lo, rows, keys)).reshape(rows, G, keys)
                for g in range(G):
                    np.testing.assert_array_equal(got[:min(rows, T - a), g], want[:min(rows, T - a)])
                np.testing.assert_array_equal(np.asarray(AB._tile_visible(cfg, a, lo, rows, keys, True)),
                                              np.asarray(AB._tile_visible(cfg, a, lo, rows, keys)).T)
    assert covered.max() <= 1 and (covered[visible] == 1).all()
    np.testing.assert_array_equal(AB._rows_seen(cfg, T * G + 3), np.r_[np.repeat(visible.any(1), G), [False] * 3])


@pytest.mark.parametrize("unroll_area", [0, 2 ** 40])  # every group walked by lax.scan / unrolled
@pytest.mark.parametrize("T,S,kw", [(20, 20, dict(is_causal=True)), (13, 17, dict(window=(3, 2))),
                                    (18, 11, dict(is_causal=True, window=(5, 0))), (9, 14, {})])
def test_blocked_two_level_tiles_match_numpy(monkeypatch, unroll_area, T, S, kw):
    """Big and small tiles together (big (8, 8) / (8, 4), small (4, 4) / (2, 2), so the causal
    diagonal, a window's edges and the padding fall in small tiles), scanned or unrolled, with
    grouped heads: values against NumPy, gradients against the reference."""
    monkeypatch.setattr(AB, "BLOCKED_FWD", ((8, 8), (4, 4)))
    monkeypatch.setattr(AB, "BLOCKED_BWD", ((8, 4), (2, 2)))
    monkeypatch.setattr(AB, "BLOCKED_UNROLL_AREA", unroll_area)
    cfg = AB._blocked_cfg(T, S, 2, kw.get("is_causal", False), kw.get("window"))
    assert {e for *_, e, _ in cfg.fwd.groups} >= {True} and len(cfg.fwd.groups + cfg.bwd.groups) >= 3
    q, k, v = _inputs(B=2, T=T, S=S, N=4, K=2, D=8, seed=T + S)
    got = jax.jit(lambda q, k, v: A.dot_product_attention(q, k, v, implementation="blocked", **kw))(q, k, v)
    np.testing.assert_allclose(got, np_attention(q, k, v, **kw), rtol=1e-5, atol=1e-5)
    for g, r in zip(_grads("blocked", q, k, v, kw), _grads("reference", q, k, v, kw)):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_blocked_traces_the_same_program_at_any_length():
    """One tile per scan step: the traced program (its matmuls) does not grow with the sequence."""
    def dots(T, causal):
        q = jnp.zeros((1, T, 4, 32))
        f = lambda q: jnp.sum(A.dot_product_attention(q, q[:, :, :2], q[:, :, :2], is_causal=causal,
                                                       implementation="blocked"))
        return str(jax.make_jaxpr(jax.grad(f))(q)).count("dot_general")
    for causal in (False, True):
        assert dots(4096, causal) == dots(16384, causal) > 0


def test_cpu_auto_picks_blocked_without_bias_or_mask(monkeypatch):
    monkeypatch.setattr(A.native, "available", lambda: False)  # no C++ compiler
    q = jnp.zeros((1, 512, 2, 32))
    assert A._auto(q, q, None, None, True, None) == "blocked"
    assert A._auto(q, q, None, jnp.ones((1, 1, 512, 512), bool), False, None) == "chunked-cpu"
    long = jnp.zeros((1, 65536, 2, 32))  # any length: the tiles are walked, not unrolled
    assert A._auto(long, long, None, None, False, None) == "blocked"


def test_reference_gradient_vanishes_for_future_and_masked_keys():
    q, k, v, kw = _case("padding_with_empty_batch")
    gq, gk, gv = _grads("reference", q, k, v, dict(kw, is_causal=True))
    assert np.all(np.asarray(gk)[0, 5:] == 0) and np.all(np.asarray(gv)[1] == 0)
    assert np.all(np.asarray(gq)[1] == 0)  # batch 1 sees no key: output 0, gradient 0


def test_chunked_gradient_matches_finite_differences():
    q, k, v = _inputs(B=1, T=3, S=5, N=2, K=1, D=4, seed=5)
    bias = jnp.asarray(np.random.default_rng(6).normal(size=(1, 2, 3, 5)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)
    args = (q, k, v, bias)

    @jax.jit
    def loss(q, k, v, bias):
        out = A.dot_product_attention(q, k, v, bias=bias, is_causal=True, implementation="chunked",
                                      block_size=2)
        return jnp.sum(out * w)

    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
    rng, eps = np.random.default_rng(8), 1e-2
    for i, g in enumerate(grads):
        d = jnp.asarray(rng.normal(size=args[i].shape), jnp.float32)
        plus = [a + eps * d if j == i else a for j, a in enumerate(args)]
        minus = [a - eps * d if j == i else a for j, a in enumerate(args)]
        fd = (loss(*plus) - loss(*minus)) / (2 * eps)  # exact for quadratics; O(eps^2) here
        np.testing.assert_allclose(float(jnp.vdot(g, d)), float(fd), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("impl", ["xla", "chunked", "blocked_q"])
def test_bfloat16_close_to_float32_reference(impl):
    q, k, v, kw = _case("gqa_causal", dtype=jnp.bfloat16)
    if impl != "blocked_q":
        kw["bias"] = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 6, 6)), jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    kw32 = dict(kw, bias=kw["bias"].astype(jnp.float32)) if "bias" in kw else kw
    attend = jax.jit(A.dot_product_attention,
                     static_argnames=("implementation", "block_size", "q_block_size", "is_causal"))
    got = attend(q, k, v, **_impl(impl), **kw)
    assert got.dtype == jnp.bfloat16
    want = attend(*f32, implementation="reference", **kw32)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)
    for g, r in zip(_grads(impl, q, k, v, kw, jnp.bfloat16), _grads("reference", *f32, kw32)):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=2e-2,
                                   atol=2e-2 * float(jnp.abs(r).max()))


@pytest.mark.gpu
def test_cudnn_matches_reference():
    q, k, v = _inputs(B=2, T=128, S=128, N=4, K=2, D=64, dtype=jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    for kw in (dict(is_causal=True), dict(is_causal=True, window=(16, 0)), dict(window=(8, 8))):
        got = A.dot_product_attention(q, k, v, implementation="cudnn", **kw)
        want = A.dot_product_attention(*f32, implementation="reference", **kw)
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)
        for g, r in zip(_grads("cudnn", q, k, v, kw, jnp.bfloat16), _grads("reference", *f32, kw)):
            np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=2e-2,
                                       atol=2e-2 * float(jnp.abs(r).max()))


def test_cached_decoding_equals_full_causal_forward():
    B, L, N, K, D, prefill = 2, 8, 4, 2, 8, 5
    q, k, v = _inputs(B=B, T=L, S=L, N=N, K=K, D=D, seed=3)
    full = jax.jit(A.dot_product_attention, static_argnames=("is_causal", "implementation"))(
        q, k, v, is_causal=True, implementation="reference")

    @jax.jit
    def prefill_step(cache, q, k, v):  # auto implementation
        cache = A.update_kv_cache(cache, k, v)
        return cache, A.decode_attention(q, cache)

    cache, row = prefill_step(A.init_kv_cache(B, 11, K, D, jnp.float32),
                              q[:, :prefill], k[:, :prefill], v[:, :prefill])
    rows = [row]

    @jax.jit
    def step(cache, q_t, k_t, v_t):
        cache = A.update_kv_cache(cache, k_t, v_t)
        return cache, A.decode_attention(q_t, cache, implementation="chunked")

    for t in range(prefill, L):
        cache, row = step(cache, q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1])
        rows.append(row)
    assert int(cache.length) == L and cache.k.shape == (B, 11, K, D)
    np.testing.assert_allclose(jnp.concatenate(rows, axis=1), full, rtol=1e-5, atol=1e-5)


def _np_softmax_attend(scores, keys, mask):
    scores = np.where(mask, scores, -np.inf)
    with np.errstate(invalid="ignore"):  # all-masked rows: nan -> 0
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w = np.nan_to_num(w / w.sum(-1, keepdims=True))
    return np.einsum("bs,bsh->bh", w, keys), w


def test_additive_and_multiplicative_attention_match_numpy():
    rng = np.random.default_rng(0)
    B, S, Hq, Hk, Att = 3, 5, 4, 6, 7
    query, keys = rng.normal(size=(B, Hq)), rng.normal(size=(B, S, Hk))
    W_q, W_k, v_a, W = (rng.normal(size=s) for s in ((Hq, Att), (Hk, Att), (Att,), (Hq, Hk)))
    mask = np.ones((B, S), bool)
    mask[1, 3:] = False
    mask[2] = False  # a row with nothing to attend: zero weights and context
    f32 = lambda *xs: [jnp.asarray(x, jnp.float32) for x in xs]  # noqa: E731

    scores = np.tanh((query @ W_q)[:, None, :] + keys @ W_k) @ v_a
    ctx, w = A.additive_attention(*f32(query, keys, W_q, W_k, v_a), mask=jnp.asarray(mask))
    want_ctx, want_w = _np_softmax_attend(scores, keys, mask)
    np.testing.assert_allclose(ctx, want_ctx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)

    ctx, w = A.multiplicative_attention(*f32(query, keys, W), mask=jnp.asarray(mask))
    want_ctx, want_w = _np_softmax_attend(np.einsum("bh,hk,bsk->bs", query, W, keys), keys, mask)
    np.testing.assert_allclose(ctx, want_ctx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)

    ctx, w = A.multiplicative_attention(*f32(keys[:, 0], keys))  # "dot", no mask
    want_ctx, want_w = _np_softmax_attend(np.einsum("bh,bsh->bs", keys[:, 0], keys), keys, True)
    np.testing.assert_allclose(ctx, want_ctx, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="W=None"):
        A.multiplicative_attention(*f32(query, keys))


@pytest.mark.parametrize("shapes, kw, match", [
    (((2, 5, 4, 8), (2, 7, 2, 8)), {}, None),  # the valid baseline
    (((5, 4, 8), (2, 7, 2, 8)), {}, r"\(5, 4, 8\)"),
    (((2, 5, 4, 8), (2, 7, 2, 6)), {}, r"D=8"),
    (((2, 5, 4, 8), (2, 7, 3, 8)), {}, r"N=4 .* K=3"),
    (((2, 5, 4, 8), (2, 7, 2, 8)), dict(mask=jnp.ones((2, 1, 5, 6), bool)), r"\(2, 1, 5, 6\)"),
    (((2, 5, 4, 8), (2, 7, 2, 8)), dict(mask=jnp.ones((2, 1, 5, 7))), r"boolean"),
    (((2, 5, 4, 8), (2, 7, 2, 8)), dict(bias=jnp.ones((3, 4, 5, 7))), r"\(3, 4, 5, 7\)"),
    (((2, 5, 4, 8), (2, 7, 2, 8)), dict(window=(-1, 2)), r"window"),
    (((2, 5, 4, 8), (2, 7, 2, 8)), dict(implementation="chunked", block_size=0), r"block_size"),
    (((2, 5, 4, 8), (2, 7, 2, 8)), dict(implementation="flash"), r"'flash'.*reference, xla, cudnn, cudnn-direct, chunked, blocked"),
    (((2, 5, 4, 8), (2, 7, 2, 8)), dict(implementation="blocked", bias=jnp.zeros((5, 7))), r"blocked.*not bias or mask"),
])
def test_bad_arguments_raise_clear_errors(shapes, kw, match):
    q, k = jnp.zeros(shapes[0]), jnp.zeros(shapes[1])
    if match is None:
        assert A.dot_product_attention(q, k, k, **kw).shape == q.shape
        return
    with pytest.raises(ValueError, match=match):
        A.dot_product_attention(q, k, k, **kw)


def test_cpu_per_example_path_for_narrow_unmasked_heads():
    """Auto on CPU sends narrow, unmasked heads one example at a time (the UNet's attention):
    values against NumPy, gradients against "reference", and masks / wide heads go elsewhere."""
    q, k, v = _inputs(B=3, T=5, S=7, N=4, K=2, D=8)
    assert A._auto(q, k, None, None, False, None) == "per-example-cpu"
    assert A._auto(q, k, None, None, True, None) != "per-example-cpu"
    wide = _inputs(B=1, T=5, S=7, N=2, K=2, D=32)
    assert A._auto(wide[0], wide[1], None, None, False, None) != "per-example-cpu"
    got = jax.jit(A.dot_product_attention)(q, k, v)
    np.testing.assert_allclose(got, np_attention(q, k, v), rtol=1e-5, atol=1e-5)
    for g, r in zip(_grads(None, q, k, v, {}), _grads("reference", q, k, v, {})):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def _loose_bound_inputs(long_key):
    """One head whose queries all point along x and whose longest key (length `long_key`) points
    along y: |q| max|k| overshoots every logit, by ~70 nats at long_key=11.5 and ~700 at 100."""
    rng = np.random.default_rng(3)
    T = S = 6
    q = np.zeros((1, T, 1, 2), np.float32)
    q[0, :, 0, 0] = 10.0
    k = np.zeros((1, S, 1, 2), np.float32)
    k[0, :, 0, 0] = rng.uniform(-1, 1, size=S)
    k[0, 0, 0, 1] = long_key
    v = rng.normal(size=(1, S, 1, 2)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


@pytest.mark.parametrize("causal", [False, True])
def test_blocked_bound_normaliser_and_its_fallback(causal):
    """The forward's one-per-row normaliser |q_i| max|k| - BOUND_HEADROOM is used on ordinary inputs
    and where the bound overshoots the row max by ~70 nats (past what m_i = |q_i| max|k| alone would
    survive), and replaced by the exact row max where it overshoots by ~700; values and gradients
    match NumPy / the reference on all three."""
    cfg = AB._blocked_cfg(6, 6, 1, causal, None, 2, 3)
    cases = ((_inputs(B=1, T=6, S=6, N=1, K=1, D=2), True, 0, 30),
             (_loose_bound_inputs(11.5), True, 50, 90), (_loose_bound_inputs(100.0), False, 500, np.inf))
    for (q, k, v), bound_used, lo, hi in cases:
        qs = np.asarray(q[0, :, 0]) / np.sqrt(2)
        logits = np.where(np.tril(np.ones((6, 6), bool)) | (not causal), qs @ np.asarray(k[0, :, 0]).T, -np.inf)
        overshoot = np.linalg.norm(qs, axis=-1) * np.linalg.norm(k[0, :, 0], axis=-1).max() - logits.max(-1)
        assert lo <= overshoot.max() < hi  # the case is what it claims to be
        l_min = AB._blocked_fwd_head(cfg, jnp.asarray(qs), k[0, :, 0], v[0, :, 0])[2]
        assert bool(l_min >= AB.BOUND_MIN_SUM) == bound_used
        kw = dict(implementation="blocked", is_causal=causal, q_block_size=2, block_size=3)
        got = jax.jit(lambda q, k, v: A.dot_product_attention(q, k, v, **kw))(q, k, v)
        np.testing.assert_allclose(got, np_attention(q, k, v, is_causal=causal), rtol=1e-5, atol=1e-5)
        case = dict(is_causal=causal)
        for g, r in zip(_grads("blocked_q", q, k, v, case), _grads("reference", q, k, v, case)):
            assert np.isfinite(np.asarray(g)).all()
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("blocks", [(4, 4), (None, None)])
def test_blocked_a_nan_key_reaches_only_the_rows_that_see_it(blocks):
    """Masked logits are replaced before exp (one fusion with it), so a NaN in a key no query may
    see yet leaves every earlier row exact; with explicit 4 x 4 blocks the key sits in a masked
    diagonal tile, with the default tiles in the one small edge tile."""
    rng = np.random.default_rng(11)
    T = 10
    q, k, v = (rng.standard_normal((1, T, 2, 8)).astype(np.float32) for _ in range(3))
    k[0, T - 1, 1, 3] = np.nan
    out = np.asarray(A.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), is_causal=True,
                                             implementation="blocked", q_block_size=blocks[0],
                                             block_size=blocks[1]))
    np.testing.assert_allclose(out[:, :T - 1], np_attention(q, k, v, is_causal=True)[:, :T - 1], rtol=1e-5,
                               atol=1e-5)
    assert np.isnan(out[0, T - 1, 1]).all() and np.isfinite(out[0, T - 1, 0]).all()


# ------------------------------------------------------------------------------------ native (C++)


@pytest.fixture
def native_kernel():
    if not native.available():
        pytest.skip(f"the native kernels do not build here: {native.unavailable_reason()}")


def _native_case(name, D=16):
    shape, make = CASES[name]
    q, k, v = _inputs(**shape, D=D)
    return q, k, v, make(q.shape[0], q.shape[1], k.shape[1], q.shape[2])


@pytest.mark.parametrize("name", list(CASES))
def test_native_matches_numpy_and_reference_gradients(native_kernel, name):
    q, k, v, kw = _native_case(name)
    got = jax.jit(lambda q, k, v: A.dot_product_attention(q, k, v, implementation="native", **kw))(q, k, v)
    np.testing.assert_allclose(got, np_attention(q, k, v, **kw), rtol=1e-5, atol=1e-5)
    for g, r in zip(_grads("native", q, k, v, kw), _grads("reference", q, k, v, kw)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(window=(150, 40)), dict(is_causal=True, window=(90, 0)),
                                dict(), dict(is_causal=True, mask=_key_padding(2, 613, [613, 300])),
                                dict(mask=np.random.default_rng(7).random((1, 4, 1, 613)) > 0.3)])
def test_native_long_sequences_match_numpy(native_kernel, kw):
    """Several key tiles (512 keys) and query tasks (128 rows), S not a multiple of the 32-key
    alignment, T != S, grouped heads (their rows share a tile), rows with no key (window, T > S),
    a key padding mask, and a random per-head key mask broadcast over the batch and queries."""
    q, k, v = _inputs(B=2, T=700, S=613, N=4, K=2, D=32, seed=5)
    got = jax.jit(lambda q, k, v: A.dot_product_attention(q, k, v, implementation="native", **kw))(q, k, v)
    np.testing.assert_allclose(got, np_attention(q, k, v, **kw), rtol=1e-5, atol=1e-5)
    for g, r in zip(_grads("native", q, k, v, kw), _grads("reference", q, k, v, kw)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("threads", ["1", "2", "5"])
def test_native_calls_from_many_threads_at_once_match_numpy(native_kernel, monkeypatch, threads):
    """The kernels' thread pool: calls from four Python threads at once, each on its own inputs
    of its own size (one call holds the pool, the others spawn their own threads; in bfloat16
    without AMX each thread's cached widened copies), and ZOO_NUM_THREADS workers (5: more than
    this machine's cores, so the pool grows), each call's values its own."""
    monkeypatch.setenv("ZOO_NUM_THREADS", threads)
    f = jax.jit(lambda q, k, v: A.dot_product_attention(q, k, v, is_causal=True, implementation="native"))
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):  # bf16: AMX, or widened copies
        cases = [_inputs(B=2, T=300 - 40 * i, S=300 - 40 * i, N=4, K=2, D=32, seed=20 + i, dtype=dtype)
                 for i in range(4)]
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            outs = list(ex.map(lambda c: np.asarray(f(*c), np.float32), cases * 3))
        for i, out in enumerate(outs):
            want = np_attention(*(np.asarray(x, np.float32) for x in cases[i % 4]), is_causal=True)
            np.testing.assert_allclose(out, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("blocks", [dict(q_block_size=10**9), dict(block_size=2**40), dict(q_block_size=3, block_size=32)])
def test_native_any_block_size_gives_the_same_values(native_kernel, blocks):
    """Blocks larger than the problem act as one block (they once asked for buffers of that
    size: std::bad_alloc); small ones as many. Values and gradients against NumPy / reference."""
    q, k, v = _inputs(B=1, T=100, S=90, N=4, K=2, D=16, seed=9)
    kw = dict(is_causal=True)
    got = A.dot_product_attention(q, k, v, implementation="native", **blocks, **kw)
    np.testing.assert_allclose(got, np_attention(q, k, v, **kw), rtol=1e-5, atol=1e-5)
    def grads(**impl):
        loss = lambda q, k, v: (A.dot_product_attention(q, k, v, **impl, **kw) ** 2).sum()
        return jax.grad(loss, (0, 1, 2))(q, k, v)

    for g, r in zip(grads(implementation="native", **blocks), grads(implementation="reference")):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_native_a_nan_key_reaches_only_the_rows_that_see_it(native_kernel):
    rng = np.random.default_rng(11)
    T = 40
    q, k, v = (rng.standard_normal((1, T, 2, 16)).astype(np.float32) for _ in range(3))
    k[0, T - 1, 1, 3] = np.nan
    out = np.asarray(A.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), is_causal=True,
                                             implementation="native"))
    np.testing.assert_allclose(out[:, :T - 1], np_attention(q, k, v, is_causal=True)[:, :T - 1], rtol=1e-5,
                               atol=1e-5)
    assert np.isnan(out[0, T - 1, 1]).all() and np.isfinite(out[0, T - 1, 0]).all()


def test_native_under_vmap_and_in_bfloat16(native_kernel):
    q, k, v = _inputs(B=3, T=33, S=33, N=2, K=1, D=16, seed=2)
    f = lambda q, k, v: A.dot_product_attention(q[None], k[None], v[None], is_causal=True, implementation="native")[0]
    got = jax.vmap(f)(q, k, v)
    np.testing.assert_allclose(got, np_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)
    # the backward under vmap (the mapped axis folds into the kernel's batch), k shared unmapped
    ref = lambda q, k, v: A.dot_product_attention(q[None], k[None], v[None], is_causal=True, implementation="reference")[0]
    grads = lambda f: jax.grad(lambda q, k, v: jnp.sum(jax.vmap(f, (0, None, 0))(q, k, v) ** 2), (0, 1, 2))(q, k[0], v)
    for g, r in zip(jax.jit(lambda: grads(f))(), grads(ref)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    bf = lambda x: x.astype(jnp.bfloat16)
    got = A.dot_product_attention(bf(q), bf(k), bf(v), is_causal=True, implementation="native")
    assert got.dtype == jnp.bfloat16
    want = np_attention(*(np.asarray(bf(x), np.float32) for x in (q, k, v)), is_causal=True)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)


def np_lse(q, k, bias=None, mask=None, is_causal=False, window=None, scale=None):
    """Float64 logsumexp of each query row's visible logits as the kernel returns it: [B, K, T, G]
    (+inf where a row sees no key)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    (B, T, N, D), (S, K) = q.shape, k.shape[1:3]
    scale = 1 / np.sqrt(D) if scale is None else scale
    logits = np.einsum("btnd,bsnd->bnts", q, np.repeat(k, N // K, axis=2)) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    t, s = np.arange(T)[:, None], np.arange(S)[None, :]
    seen = np.ones((T, S), bool) & ((s <= t) if is_causal else True)
    if window is not None:
        seen = seen & (s >= t - window[0]) & (s <= t + window[1])
    seen = np.broadcast_to(seen, logits.shape) & (True if mask is None else np.broadcast_to(mask, logits.shape))
    x = np.where(seen, logits, -np.inf)
    m = x.max(-1, keepdims=True)
    total = np.exp(x - np.where(np.isfinite(m), m, 0)).sum(-1)
    lse = np.where(total > 0, m[..., 0] + np.log(np.maximum(total, 1e-300)), np.inf)
    return lse.reshape(B, K, N // K, T).transpose(0, 1, 3, 2)


BF16_CASES = [  # (shape, kw): every tile and padding path of the bfloat16 forward
    (dict(B=2, T=700, S=613, N=4, K=2, D=48), dict(is_causal=True)),  # head dim padded to 64
    (dict(B=1, T=300, S=1100, N=2, K=1, D=16), dict(window=(150, 40), scale=0.3)),
    (dict(B=2, T=130, S=200, N=3, K=3, D=64), dict(mask=_key_padding(2, 200, [200, 77]), scale=-0.2)),
    (dict(B=1, T=96, S=530, N=4, K=1, D=32), dict(bias="alibi", is_causal=True)),
    (dict(B=1, T=7, S=3, N=2, K=2, D=16), dict(window=(0, 0))),  # rows with no key
]


@pytest.mark.parametrize("amx", ["1", "0"])  # "0": the inputs widened to float32 (as without AMX)
@pytest.mark.parametrize("shape,kw", BF16_CASES)
def test_native_bfloat16_matches_numpy_and_reference_gradients(native_kernel, monkeypatch, amx, shape, kw):
    """bfloat16 q, k, v: the logits' logsumexp to float32 accuracy (exact products, float32
    sums), the output to bfloat16's (its probabilities rounded to bfloat16 for p v), with Intel
    AMX where the CPU has it and without; the gradients (AMX: p and ds rounded to bfloat16 for
    their products) against the float32 reference's on the same bf16 inputs."""
    monkeypatch.setenv("ZOO_NATIVE_AMX", amx)
    q, k, v = _inputs(**shape, seed=8, dtype=jnp.bfloat16)
    B, T, N, _ = q.shape
    if kw.get("bias") == "alibi":
        slopes = 2.0 ** -np.arange(1, N + 1)
        kw = dict(kw, bias=(-slopes[:, None, None] * np.abs(np.arange(T)[:, None] - np.arange(k.shape[1])))[None]
                  .astype(np.float32))
    f32 = [np.asarray(x, np.float32) for x in (q, k, v)]  # the bf16 inputs, exactly
    o, lse = native.attention_forward(q, k, v, kw.get("mask"), kw.get("bias"), is_causal=kw.get("is_causal", False),
                                      window=kw.get("window"), scale=kw.get("scale", 1 / np.sqrt(q.shape[-1])))
    assert o.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    np.testing.assert_allclose(lse, np_lse(*f32[:2], **kw), rtol=1e-5, atol=1e-5)
    want = np_attention(*f32, **kw)
    np.testing.assert_allclose(np.asarray(o, np.float32), want, rtol=2e-2, atol=1e-2)
    got = A.dot_product_attention(q, k, v, implementation="native", **kw)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(o, np.float32))
    kw = {n: jnp.asarray(x) if isinstance(x, np.ndarray) else x for n, x in kw.items()}
    for i, (g, r) in enumerate(zip(_grads("native", q, k, v, kw, jnp.bfloat16),
                                   _grads("reference", *(jnp.asarray(x) for x in f32), kw))):
        assert g.dtype == (jnp.bfloat16 if i < 3 else jnp.float32)  # dq, dk, dv; dbias: the bias's
        np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=3e-2, atol=3e-2)


def test_native_bfloat16_nan_key_reaches_only_the_rows_that_see_it(native_kernel):
    q, k, v = _inputs(B=1, T=40, S=40, N=2, K=2, D=32, seed=12)
    k = k.at[0, 39, 1, 3].set(jnp.nan).astype(jnp.bfloat16)
    q, v = q.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    out = np.asarray(A.dot_product_attention(q, k, v, is_causal=True, implementation="native"), np.float32)
    want = np_attention(*(np.asarray(x, np.float32) for x in (q, k, v)), is_causal=True)
    np.testing.assert_allclose(out[:, :39], want[:, :39], rtol=2e-2, atol=1e-2)
    assert np.isnan(out[0, 39, 1]).all() and np.isfinite(out[0, 39, 0]).all()


def test_native_traced_scale_gets_its_gradient(native_kernel):
    q, k, v = _inputs(B=1, T=20, S=20, N=2, K=2, D=16, seed=3)
    loss = lambda scale, impl: jnp.sum(A.dot_product_attention(q, k, v, scale=scale, implementation=impl) ** 2)
    got = jax.jit(jax.value_and_grad(lambda s: loss(s, "native")))(0.3)
    want = jax.value_and_grad(lambda s: loss(s, "reference"))(0.3)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_cpu_auto_picks_native_where_it_applies(native_kernel):
    q = jnp.zeros((1, 64, 2, 32))
    assert A._auto(q, q, None, None, True, None) == "native"
    assert A._auto(q, q, jnp.zeros((64, 64)), None, True, None) == "native"
    assert A._auto(q, q, None, jnp.ones((1, 1, 1, 64), bool), True, None) == "native"
    assert A._auto(q[..., :24], q[..., :24], None, None, True, None) != "native"  # head dim 24
    assert A._auto(q[:, :32], q[:, :32], None, None, True, None) != "native"  # 32 x 32 logits


def test_native_refuses_what_it_does_not_do():
    q, k, v = _inputs(T=5, S=7, D=8)
    with pytest.raises(ValueError, match="multiple of 16; got 8"):
        A.dot_product_attention(q, k, v, implementation="native")


def test_native_unavailable_is_a_clear_error_and_auto_falls_back(monkeypatch, tmp_path):
    with pytest.raises(native.NativeUnavailable, match="does not run"):
        native.build(cxx=str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "_state", {"error": "no C++ compiler found (set CXX, or install g++)"})
    q, k, v = _inputs(T=300, S=300, N=2, K=2, D=32)
    with pytest.raises(RuntimeError, match="not available here: no C.. compiler"):
        A.dot_product_attention(q, k, v, implementation="native")
    assert A._auto(q, k, None, None, True, None) == "blocked"
    np.testing.assert_allclose(A.dot_product_attention(q, k, v, is_causal=True),
                               np_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)


def test_native_build_is_cached_and_reused(native_kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ZOO_NATIVE_CXXFLAGS", "-O0")  # a library of its own (the flags are in its key), built in
    path = native.build()                              # half the time; the test loads nothing from it
    assert path.parent == tmp_path / "native" and path.exists()
    mtime = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == mtime  # not compiled again
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left


def test_native_runs_per_device_under_a_mesh_and_pmap(native_kernel):
    """Batch-sharded inputs: each device runs the kernel on its own examples (no all-gather in
    the compiled program, forward or backward), and the values and gradients are those of one
    device -- a bias shared by the batch (replicated) and its gradient (summed over devices)
    included; a (data, fsdp) batch axis and pmap too."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    q, k, v = _inputs(B=8, T=64, S=64, N=4, K=2, D=16, seed=4)
    w = jnp.asarray(np.random.default_rng(5).normal(size=q.shape), jnp.float32)
    bias = jnp.asarray(np.random.default_rng(6).normal(size=(1, 4, 64, 64)), jnp.float32)
    mask = jnp.asarray(_key_padding(8, 64, [64, 10, 33, 64, 1, 50, 64, 64]))  # sharded with the batch
    loss = lambda q, k, v, bias: jnp.sum(A.dot_product_attention(q, k, v, mask=mask, bias=bias, is_causal=True,
                                                                 implementation="native") * w)
    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for mesh, spec in ((Mesh(np.array(jax.devices()), ("data",)), P("data")),
                       (Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp")), P(("data", "fsdp")))):
        put = lambda x: jax.device_put(x, NamedSharding(mesh, spec))
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
        bias_r = jax.device_put(bias, NamedSharding(mesh, P()))
        hlo = step.lower(put(q), put(k), put(v), bias_r).compile().as_text()
        assert "all-gather" not in hlo and "custom_call_target=\"zoo_attention_forward\"" in hlo.replace(" ", "")
        got = step(put(q), put(k), put(v), bias_r)
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(want[0], np.sum(np_attention(q, k, v, mask=mask, bias=bias, is_causal=True) * w),
                               rtol=1e-5)
    per_device = lambda x: x.reshape(8, 1, *x.shape[1:])
    out = jax.pmap(lambda q, k, v: A.dot_product_attention(q, k, v, is_causal=True, implementation="native"))(
        per_device(q), per_device(k), per_device(v))
    np.testing.assert_allclose(out.reshape(q.shape), np_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)


def test_native_bfloat16_runs_per_device_under_a_mesh(native_kernel):
    """The bf16 kernels under a batch-sharded jit: no all-gather, and each example's values and
    gradients bit for bit those of one device (every (batch, kv head) task is independent)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    q, k, v = _inputs(B=8, T=96, S=96, N=4, K=2, D=32, seed=13, dtype=jnp.bfloat16)
    loss = lambda q, k, v: jnp.sum(A.dot_product_attention(q, k, v, is_causal=True, implementation="native")
                                   .astype(jnp.float32) ** 2)
    grads = jax.grad(loss, argnums=(0, 1, 2))
    want = jax.jit(grads)(q, k, v)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    put = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
    hlo = jax.jit(grads).lower(put(q), put(k), put(v)).compile().as_text().replace(" ", "")
    assert "all-gather" not in hlo
    assert 'custom_call_target="zoo_attention_forward_bf16"' in hlo
    assert 'custom_call_target="zoo_attention_backward_bf16"' in hlo
    for g, r in zip(jax.jit(grads)(put(q), put(k), put(v)), want):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32))


@pytest.mark.parametrize("blocks", [(3, 33), (1, 32), (50, 1000)])
def test_native_block_sizes_match_numpy(native_kernel, blocks):
    """Explicit sizes: 3 positions x 2 grouped heads per task with 64-key tiles (33 rounds up),
    one position with 32, and one task of 100 positions with a single tile."""
    q, k, v = _inputs(B=1, T=100, S=90, N=4, K=2, D=16, seed=6)
    kw = dict(is_causal=True, window=(40, 0))
    f = lambda q, k, v: A.dot_product_attention(q, k, v, implementation="native", q_block_size=blocks[0],
                                                block_size=blocks[1], **kw)
    np.testing.assert_allclose(jax.jit(f)(q, k, v), np_attention(q, k, v, **kw), rtol=1e-5, atol=1e-5)
    w = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
    got = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), (0, 1, 2))(q, k, v)
    for g, r in zip(got, _grads("reference", q, k, v, kw)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_native_with_no_keys_gives_zeros_and_zero_gradients(native_kernel):
    q, k, v = _inputs(B=2, T=5, S=7, N=2, K=1, D=16)
    k, v = k[:, :0], v[:, :0]
    f = lambda q, k, v: jnp.sum(A.dot_product_attention(q, k, v, implementation="native") ** 2 + q)
    out = A.dot_product_attention(q, k, v, implementation="native")
    dq, dk, dv = jax.grad(f, (0, 1, 2))(q, k, v)
    assert not np.asarray(out).any() and dk.shape == k.shape and dv.shape == v.shape
    np.testing.assert_array_equal(dq, np.ones(q.shape, np.float32))  # only the "+ q" term


@pytest.mark.parametrize("shape", [(2, 4, 300, 613), (1, 4, 300, 613), (2, 1, 1, 613), (1, 1, 300, 1), (4, 1, 613),
                                   (613,)])  # (1, 1, 300, 1): a per-row constant, dbias 0 up to rounding
def test_native_bias_of_every_broadcast_shape_and_its_gradient(native_kernel, shape):
    """A bias broadcast along any axes (batch, heads, queries, keys), several key tiles and query
    steps, grouped heads: values and gradients (dbias summed over what it broadcasts along) vs
    NumPy and the reference; without a differentiated bias no dbias is computed (symbolic zeros)."""
    q, k, v = _inputs(B=2, T=300, S=613, N=4, K=2, D=16, seed=9)
    bias = jnp.asarray(np.random.default_rng(3).normal(size=shape), jnp.float32)
    kw = dict(bias=bias, is_causal=True)
    got = jax.jit(lambda q, k, v: A.dot_product_attention(q, k, v, implementation="native", **kw))(q, k, v)
    np.testing.assert_allclose(got, np_attention(q, k, v, **kw), rtol=1e-5, atol=1e-5)
    for g, r in zip(_grads("native", q, k, v, kw), _grads("reference", q, k, v, kw)):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=max(2e-5, 1e-5 * float(np.abs(r).max())))
    # bias held fixed (e.g. ALiBi): the backward skips dbias
    f = lambda q: jnp.sum(A.dot_product_attention(q, k, v, implementation="native", **kw) ** 2)
    hlo = jax.jit(jax.grad(f)).lower(q).as_text()
    assert "bias_grad = false" in hlo and "bias_grad = true" not in hlo
