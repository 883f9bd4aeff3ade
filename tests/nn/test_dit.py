"""DiT (zoo.nn.dit) against an independent NumPy transcription of the official models.py, plus the
adaLN-Zero property (identity blocks, zero output at init) and the error messages."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.errors import ConfigError, DataError
from zoo.nn.dit import (DiT, DiTBlock, DiTConfig, patchify, sincos_2d_positions, timestep_embedding,
                        unpatchify)

# A non-square 2 x 3 patch grid, so row/column mix-ups in positions or patch order show.
CFG = DiTConfig(image_shape=(4, 6, 2), patch_size=2, width=16, depth=2, num_heads=2, num_classes=3)
B = 3
KEY = jax.random.key(0, impl="unsafe_rbg")  # compiles in a fraction of threefry's time on CPU


def _inputs(cfg=CFG, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, *cfg.image_shape)).astype(np.float32)
    t = np.array([0, 17, 999], np.int32)
    label = np.array([0, 2, cfg.num_classes], np.int32)  # the last: no label
    return x, t, label


def _randomize(params, seed=1, std=0.3):
    """Every parameter replaced by N(0, std^2): no zero gates, so every path is exercised."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (std * rng.normal(size=a.shape)).astype(np.float32), params)


@pytest.fixture(scope="module")
def model_params():
    x, t, label = _inputs()
    model = DiT(CFG)
    params = jax.jit(model.init)(KEY, x, t, label)["params"]
    return model, params, jax.jit(model.apply)


# ------------------------------------------------------------------------ NumPy transcription


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def np_dense(p, x):
    return x @ p["kernel"] + p["bias"]


def np_silu(x):
    return x / (1 + np.exp(-x))


def np_layer_norm(x, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_block(p, x, c, heads):
    """DiTBlock.forward of the official models.py, with timm's Attention and Mlp written out."""
    Bn, N, D = x.shape
    E = D // heads
    sm, cm, gm, sf, cf, gf = np.split(np_dense(p["adaLN_modulation"], np_silu(c)), 6, axis=-1)
    h = np_layer_norm(x) * (1 + cm[:, None]) + sm[:, None]
    qkv = np_dense(p["attn"]["qkv"], h).reshape(Bn, N, 3, heads, E).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv  # each [B, heads, N, E]
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(E)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = (w @ v).transpose(0, 2, 1, 3).reshape(Bn, N, D)
    x = x + gm[:, None] * np_dense(p["attn"]["proj"], o)
    h = np_layer_norm(x) * (1 + cf[:, None]) + sf[:, None]
    return x + gf[:, None] * np_dense(p["fc2"], np_gelu_tanh(np_dense(p["fc1"], h)))


def np_patchify(x, p):
    Bn, H, W, C = x.shape
    out = np.zeros((Bn, (H // p) * (W // p), p * p * C))
    for r in range(H // p):
        for col in range(W // p):
            out[:, r * (W // p) + col] = x[:, r * p:(r + 1) * p, col * p:(col + 1) * p].reshape(Bn, -1)
    return out


def np_unpatchify(x, p, H, W, C):
    out = np.zeros((x.shape[0], H, W, C))
    for r in range(H // p):
        for col in range(W // p):
            out[:, r * p:(r + 1) * p, col * p:(col + 1) * p] = x[:, r * (W // p) + col].reshape(-1, p, p, C)
    return out


def np_sincos_2d(D, gh, gw):
    """Closed form, element by element: each patch (row, col) gets [sin(col w), cos(col w),
    sin(row w), cos(row w)], w_i = 1 / 10000^(2i / (D/2)), i < D/4 (official column-first order)."""
    q = D // 4
    out = np.zeros((gh * gw, D))
    for n in range(gh * gw):
        row, col = divmod(n, gw)
        for i in range(q):
            w = 1.0 / 10000 ** (2 * i / (D // 2))
            out[n, [i, q + i, 2 * q + i, 3 * q + i]] = [math.sin(col * w), math.cos(col * w),
                                                        math.sin(row * w), math.cos(row * w)]
    return out


def np_timestep(t, dim, max_period=10000.0):
    """Frequencies and arguments t * f_i in float32 as in the official code (at t ~ 1000 the rounding of
    the argument, ~1e-4 rad, is the largest error in the whole forward); sin/cos in float64."""
    half = dim // 2
    f = np.exp(np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half))
    a = (np.asarray(t, np.float32)[:, None] * f).astype(np.float64)
    return np.concatenate([np.cos(a), np.sin(a)], axis=-1)


def np_dit(p, cfg, x, t, label):
    H, W, C = cfg.image_shape
    P = cfg.patch_size
    h = np_dense(p["x_embedder"], np_patchify(x, P)) + np_sincos_2d(cfg.width, H // P, W // P)
    te = p["t_embedder"]
    c = np_dense(te["mlp_2"], np_silu(np_dense(te["mlp_0"], np_timestep(t, 256))))
    c = c + p["y_embedder"]["embedding"][label]
    for i in range(cfg.depth):
        h = np_block(p[f"block_{i}"], h, c, cfg.num_heads)
    fl = p["final_layer"]
    shift, scale = np.split(np_dense(fl["adaLN_modulation"], np_silu(c)), 2, axis=-1)
    h = np_layer_norm(h) * (1 + scale[:, None]) + shift[:, None]
    return np_unpatchify(np_dense(fl["linear"], h), P, H, W, C)


# ----------------------------------------------------------------------------------- tests


def test_adaln_zero_init_outputs_zero_and_blocks_are_identity(model_params):
    model, params, apply = model_params
    x, t, label = _inputs()
    out = apply({"params": params}, x, t, label)
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    rng = np.random.default_rng(3)
    h = rng.normal(size=(B, 6, CFG.width)).astype(np.float32)
    c = rng.normal(size=(B, CFG.width)).astype(np.float32)
    block_apply = jax.jit(DiTBlock(CFG.num_heads, CFG.mlp_ratio).apply)
    for i in range(CFG.depth):
        y = block_apply({"params": params[f"block_{i}"]}, h, c)
        np.testing.assert_array_equal(np.asarray(y), h)


def test_init_matches_official_scheme(model_params):
    _, params, apply = model_params
    params = _np(params)
    qkv_max = np.abs(params["block_0"]["attn"]["qkv"]["kernel"]).max()  # xavier_uniform, 16 -> 48
    bound = math.sqrt(6 / (16 + 48))
    assert 0.8 * bound < qkv_max <= bound
    assert 0.01 < params["y_embedder"]["embedding"].std() < 0.03
    assert 0.01 < params["t_embedder"]["mlp_0"]["kernel"].std() < 0.03
    for block, layer in (("block_1", "adaLN_modulation"), ("final_layer", "adaLN_modulation"),
                         ("final_layer", "linear")):
        assert not params[block][layer]["kernel"].any() and not params[block][layer]["bias"].any()


def test_only_final_linear_gets_gradient_at_init(model_params):
    """adaLN-Zero: with the final linear at zero, it is the only parameter with a first gradient."""
    model, params, apply = model_params
    x, t, label = _inputs()
    target = np.random.default_rng(4).normal(size=x.shape)
    loss = lambda p: jnp.sum(model.apply({"params": p}, x, t, label) * target)
    grads = jax.tree_util.tree_leaves_with_path(jax.jit(jax.grad(loss))(params))
    nonzero = {jax.tree_util.keystr(k) for k, g in grads if np.any(np.asarray(g))}
    assert nonzero == {"['final_layer']['linear']['bias']", "['final_layer']['linear']['kernel']"}


def test_block_matches_numpy():
    rng = np.random.default_rng(5)
    h = rng.normal(size=(B, 6, 16)).astype(np.float32)
    c = rng.normal(size=(B, 16)).astype(np.float32)
    block = DiTBlock(num_heads=4, mlp_ratio=2.0)
    params = _randomize(jax.jit(block.init)(KEY, h, c)["params"])
    got = jax.jit(block.apply)({"params": params}, h, c)
    want = np_block(_np(params), h.astype(np.float64), c.astype(np.float64), 4)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_full_model_matches_numpy(model_params):
    model, params, apply = model_params
    params = _randomize(params, std=0.2)
    x, t, label = _inputs()
    got = apply({"params": params}, x, t, label)
    want = np_dit(_np(params), CFG, x.astype(np.float64), t, label)
    assert np.abs(want).max() > 0.1  # the comparison is not between near-zeros
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=5e-5)  # the t-embedding's float32 floor


def test_patchify_roundtrip_and_order():
    x = np.random.default_rng(6).normal(size=(2, 4, 6, 3)).astype(np.float32)
    patches = patchify(jnp.asarray(x), 2)
    np.testing.assert_array_equal(np.asarray(patches), np_patchify(x, 2).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(unpatchify(patches, 2, 4, 6, 3)), x)
    y = np.random.default_rng(7).normal(size=(2, 6, 12)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(y), 2, 4, 6, 3)),
                                  np_unpatchify(y, 2, 4, 6, 3).astype(np.float32))


@pytest.mark.parametrize("D,gh,gw", [(16, 2, 3), (32, 4, 4)])
def test_sincos_positions_closed_form(D, gh, gw):
    got = sincos_2d_positions(D, gh, gw)
    assert got.shape == (gh * gw, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, np_sincos_2d(D, gh, gw), rtol=0, atol=1e-6)


def test_timestep_embedding_closed_form():
    t = np.array([0.0, 1.0, 17.5, 999.0])
    # XLA's and NumPy's float32 exp may differ by one ulp (1.5e-7 relative): at t = 999 that moves
    # the argument t * f_i by up to 1.5e-4 rad, the float32 floor of this embedding
    np.testing.assert_allclose(np.asarray(timestep_embedding(t, 256)), np_timestep(t, 256), atol=2e-4)
    odd = np.asarray(timestep_embedding(t, 7))
    assert odd.shape == (4, 7) and np.all(odd[:, -1] == 0)
    np.testing.assert_allclose(odd[:, :6], np_timestep(t, 6), atol=1e-5)


def test_class_conditioning(model_params):
    _, params, apply = model_params
    v = {"params": _randomize(params, std=0.2)}
    x, t, _ = _inputs()
    x1, t1 = np.repeat(x[:1], B, 0), np.repeat(t[1:2], B, 0)  # one image, one t, B labels
    out = np.asarray(apply(v, x1, t1, np.arange(B, dtype=np.int32)))
    for i in range(B):
        for j in range(i):
            assert np.abs(out[i] - out[j]).max() > 1e-3
    null = np.full(B, CFG.num_classes, np.int32)
    np.testing.assert_array_equal(np.asarray(apply(v, x1, t1, None)), np.asarray(apply(v, x1, t1, null)))
    np.testing.assert_array_equal(np.asarray(apply(v, x1, t1[0], np.arange(B, dtype=np.int32))), out)


@pytest.mark.parametrize("kw,match", [
    (dict(image_shape=(4, 6)), "image_shape"),
    (dict(image_shape=(4, 6, 0)), "image_shape"),
    (dict(patch_size=4), "not divisible by patch_size 4; valid: 1, 2"),
    (dict(patch_size=0), "patch_size"),
    (dict(width=18, num_heads=4), "num_heads"),
    (dict(width=6, num_heads=2), "multiple of 4"),
    (dict(depth=0), "depth must be >= 1"),
    (dict(mlp_ratio=0.0), "mlp_ratio"),
    (dict(num_classes=-1), "num_classes"),
    (dict(dtype=jnp.int32), "dtype"),
])
def test_bad_config(kw, match):
    with pytest.raises(ConfigError, match=match):
        DiTConfig(**{**dict(image_shape=(4, 6, 2), width=16, num_heads=2), **kw})


def test_bad_inputs(model_params):
    model, params, apply = model_params
    x, t, label = _inputs()
    v = {"params": params}
    with pytest.raises(DataError, match=r"images \[B, 4, 6, 2\]"):
        model.apply(v, x[:, :, :4], t, label)
    with pytest.raises(DataError, match="timesteps"):
        model.apply(v, x, t[:2], label)
    with pytest.raises(DataError, match="labels"):
        model.apply(v, x, t, label.astype(np.float32))
    uncond = DiT(DiTConfig(image_shape=(4, 6, 2), width=16, depth=1, num_heads=2))
    with pytest.raises(DataError, match="num_classes=0"):
        jax.eval_shape(uncond.init, KEY, x, t, label)


def test_bf16_compute_close_to_f32(model_params):
    _, params, apply = model_params
    params = _randomize(params, std=0.1)
    x, t, label = _inputs()
    f32 = np.asarray(apply({"params": params}, x, t, label))
    bf16_model = DiT(DiTConfig(**{**CFG.__dict__, "dtype": jnp.bfloat16}))
    bf16 = jax.jit(bf16_model.apply)({"params": params}, x, t, label)
    assert bf16.dtype == jnp.float32
    err = np.abs(np.asarray(bf16) - f32).max() / np.abs(f32).max()
    assert err < 0.02, err  # measured 0.005
