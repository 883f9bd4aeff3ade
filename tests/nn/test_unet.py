"""zoo.nn.unet: parameter counts (DDPM CIFAR-10 and, when diffusers is installed, small configs),
outputs of ported diffusers UNet2DModel weights, a NumPy transcription of one ResNet block and the
timestep features, bf16 against f32, and the errors for bad configs, inputs and state_dicts.

On CPU, compiling dominates these tests: eager Flax compiles every op on first use (UNet.init
eagerly takes a minute), so params come from param_shapes + NumPy noise, and forward passes go
through one cached jit per config compiled at XLA's lowest backend optimisation level.
"""

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.errors import ConfigError, DataError
from zoo.nn.unet import (DDPM_CIFAR10, ResnetBlock, UNet, UNetConfig, _to_flax, diffusers_kwargs,
                         from_diffusers, nearest_up2_conv3x3, param_shapes, timestep_embedding)
from zoo.ops.lora import count_params

TINY = UNetConfig(in_channels=2, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                  attention_levels=(False, True), norm_num_groups=8, attention_head_dim=8, num_classes=3,
                  dropout=0.1)


@functools.lru_cache(maxsize=None)
def _forward(cfg, deterministic=True):
    """jit(UNet(cfg).apply) as (params, x, t, labels[, dropout key]) -> out, compiled quickly."""
    if deterministic:
        fn = lambda p, x, t, y: UNet(cfg).apply({"params": p}, x, t, y)  # noqa: E731
    else:
        fn = lambda p, x, t, y, key: UNet(cfg).apply(  # noqa: E731
            {"params": p}, x, t, y, deterministic=False, rngs={"dropout": key})
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def _random_params(cfg, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: scale * rng.standard_normal(s.shape).astype(np.float32),
                        param_shapes(cfg))


def _inputs(cfg, B=2, H=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, H, H, cfg.in_channels)).astype(np.float32)
    return x, rng.integers(0, 1000, B), rng.integers(0, cfg.num_classes + 1, B)


# ------------------------------------------------------------------------------ parameter counts


def test_ddpm_cifar10_has_diffusers_parameter_count():
    # UNet2DModel(block_out_channels=(128, 256, 256, 256), AttnDownBlock2D on level 1, ...) in
    # diffusers 0.42.1
    assert count_params(param_shapes(DDPM_CIFAR10)) == 35_746_307


SMALL = [
    TINY,
    UNetConfig(in_channels=3, block_out_channels=(16, 32, 48), layers_per_block=2,
               attention_levels=(True, False, True), norm_num_groups=16, attention_head_dim=16,
               num_classes=10),
    UNetConfig(in_channels=1, out_channels=2, block_out_channels=(32,), layers_per_block=1,
               attention_levels=(True,), norm_num_groups=4),
]


@pytest.mark.parametrize("cfg", SMALL, ids=["tiny", "three-levels", "one-level"])
def test_small_configs_match_diffusers_count(cfg):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("torch")
    model = diffusers.UNet2DModel(**diffusers_kwargs(cfg))
    assert count_params(param_shapes(cfg)) == sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------- diffusers weights, outputs


@pytest.mark.parametrize("cfg", [
    TINY,
    UNetConfig(in_channels=1, block_out_channels=(8, 16, 16), layers_per_block=2,
               attention_levels=(True, False, True), norm_num_groups=4, attention_head_dim=4, dropout=0.1),
], ids=["tiny-classes", "three-levels-dropout"])
def test_ported_diffusers_weights_give_the_same_outputs(cfg):
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**diffusers_kwargs(cfg)).eval()
    with torch.no_grad():  # move every tensor off its init (GroupNorm 1/0 would hide swapped names)
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    params = from_diffusers(model.state_dict(), cfg)
    x, t, y = _inputs(cfg)
    labels = y if cfg.num_classes else None
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                    None if labels is None else torch.from_numpy(labels)).sample.numpy()
    out = _forward(cfg)(params, x, t, labels)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=1e-4, rtol=1e-4)

    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    with pytest.raises(DataError, match="missing.*conv_out/bias"):
        from_diffusers({k: v for k, v in sd.items() if k != "conv_out.bias"}, cfg)
    with pytest.raises(DataError, match="unexpected.*extra.weight"):
        from_diffusers({**sd, "extra.weight": np.zeros(3)}, cfg)
    with pytest.raises(DataError, match="shape mismatch.*conv_in.weight"):
        from_diffusers({**sd, "conv_in.weight": np.zeros((5, cfg.in_channels, 3, 3))}, cfg)


# ------------------------------------------------------------------ independent NumPy reference


def _np_group_norm(x_BxCxHxW, G, w, b):
    B, C, H, W = x_BxCxHxW.shape
    g = x_BxCxHxW.reshape(B, G, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
    return g.reshape(B, C, H, W) * w[None, :, None, None] + b[None, :, None, None]


def _np_conv(x_BxCxHxW, w_OxIxKxK, b):
    K = w_OxIxKxK.shape[-1]
    p = (K - 1) // 2
    xp = np.pad(x_BxCxHxW, ((0, 0), (0, 0), (p, p), (p, p)))
    H, W = x_BxCxHxW.shape[2:]
    out = sum(np.einsum("bihw,oi->bohw", xp[:, :, i:i + H, j:j + W], w_OxIxKxK[:, :, i, j])
              for i in range(K) for j in range(K))
    return out + b[None, :, None, None]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_upsample_by_phase_equals_nearest_upsample_then_conv(dtype):
    """nearest_up2_conv3x3 (one 2x2 conv by output phase) against the definition in NumPy: repeat
    rows and columns, then the padded 3x3 conv; odd sizes so no phase is symmetric to another."""
    rng = np.random.default_rng(2)
    B, H, W, I, O = 2, 3, 5, 4, 6
    x, k, b = (rng.standard_normal(s).astype(np.float32) for s in ((B, H, W, I), (3, 3, I, O), (O,)))
    up = np.repeat(np.repeat(x.transpose(0, 3, 1, 2), 2, axis=2), 2, axis=3)
    ref = _np_conv(up, k.transpose(3, 2, 0, 1), b).transpose(0, 2, 3, 1)
    got = jax.jit(nearest_up2_conv3x3)(jnp.asarray(x, dtype), k, b)
    assert got.shape == (B, 2 * H, 2 * W, O) and got.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=tol * np.abs(ref).max(), rtol=tol)
    no_bias = jax.jit(nearest_up2_conv3x3)(jnp.asarray(x), k)
    np.testing.assert_allclose(no_bias, ref - b, atol=1e-5 * np.abs(ref).max())


def _np_silu(x):
    return x / (1 + np.exp(-x))


def test_resnet_block_matches_numpy_transcription():
    """ResnetBlock2D transcribed in NumPy, in torch layout (NCHW, OIHW): checks the math and _to_flax."""
    cfg = UNetConfig(block_out_channels=(4, 8), norm_num_groups=2, attention_head_dim=4)
    B, I, O, E, H = 2, 4, 6, 5, 5
    rng = np.random.default_rng(1)
    w = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.5  # noqa: E731
    tw = {"norm1": (1 + w(I), w(I)), "conv1": (w(O, I, 3, 3), w(O)), "time_emb_proj": (w(O, E), w(O)),
          "norm2": (1 + w(O), w(O)), "conv2": (w(O, O, 3, 3), w(O)), "conv_shortcut": (w(O, I, 1, 1), w(O))}
    x, temb = w(B, I, H, H), w(B, E)

    h = _np_conv(_np_silu(_np_group_norm(x, 2, *tw["norm1"])), *tw["conv1"])
    h = h + (_np_silu(temb) @ tw["time_emb_proj"][0].T + tw["time_emb_proj"][1])[:, :, None, None]
    h = _np_conv(_np_silu(_np_group_norm(h, 2, *tw["norm2"])), *tw["conv2"])
    ref = _np_conv(x, *tw["conv_shortcut"]) + h

    leaf = lambda name: "scale" if name.startswith("norm") else "kernel"  # noqa: E731
    params = {n: {leaf(n): _to_flax(a, leaf(n)), "bias": b} for n, (a, b) in tw.items()}
    block = jax.jit(ResnetBlock(cfg, O).apply, compiler_options={"xla_backend_optimization_level": 0})
    out = block({"params": params}, x.transpose(0, 2, 3, 1), temb)
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=1e-4, rtol=1e-4)


def test_timestep_embedding_closed_form():
    t = np.array([0.0, 1.0, 7.5, 999.0])
    out = np.asarray(timestep_embedding(t, 7))  # odd width: 3 frequencies, then a zero column
    f = np.exp(-math.log(10000.0) * np.arange(3) / 3)
    np.testing.assert_allclose(out[:, :3], np.cos(t[:, None] * f), atol=1e-5)
    np.testing.assert_allclose(out[:, 3:6], np.sin(t[:, None] * f), atol=1e-4)
    np.testing.assert_array_equal(out[:, 6], 0.0)


def test_batch_independence_labels_and_dropout():
    """Each sample's output depends on its own image and label only (GroupNorm is per sample); no
    label means the unconditional row; dropout acts only when not deterministic."""
    params = _random_params(TINY)
    x, t, y = _inputs(TINY)
    out = np.asarray(_forward(TINY)(params, x, t, y))
    x2 = x.copy()
    x2[1] += 1.0
    other = np.array([y[0], (y[1] + 1) % (TINY.num_classes + 1)])
    for changed in (_forward(TINY)(params, x2, t, y), _forward(TINY)(params, x, t, other)):
        np.testing.assert_allclose(changed[0], out[0], atol=1e-5)
        assert not np.allclose(changed[1], out[1], atol=1e-3)
    uncond = np.full(2, TINY.num_classes)
    np.testing.assert_allclose(_forward(TINY)(params, x, t, None), _forward(TINY)(params, x, t, uncond),
                               atol=1e-6)
    key = jax.random.key(0)
    drop = np.asarray(_forward(TINY, deterministic=False)(params, x, t, y, key))
    np.testing.assert_array_equal(_forward(TINY, deterministic=False)(params, x, t, y, key), drop)
    assert not np.allclose(drop, out, atol=1e-3)


# ------------------------------------------------------------------------------------ bf16, errors


def test_bf16_compute_is_close_to_f32():
    cfg16 = dataclasses.replace(TINY, dtype=jnp.bfloat16)
    params = _random_params(TINY, scale=0.2)
    x, t, y = _inputs(TINY)
    ref = np.asarray(_forward(TINY)(params, x, t, y))
    out = _forward(cfg16)(params, x, t, y)
    assert out.dtype == jnp.float32
    err = np.abs(np.asarray(out) - ref).max() / ref.std()
    assert err < 0.1, err


@pytest.mark.parametrize("kw, match", [
    (dict(block_out_channels=(16, 30), norm_num_groups=8), "divisible by norm_num_groups=8"),
    (dict(attention_levels=(False, True, True)), "one bool per level"),
    (dict(block_out_channels=(32, 36), norm_num_groups=4), "divisible by attention_head_dim=8"),
    (dict(block_out_channels=()), "non-empty"),
    (dict(layers_per_block=0), "layers_per_block must be a positive int"),
    (dict(dropout=1.0), "dropout"),
    (dict(num_classes=-1), "num_classes"),
])
def test_bad_configs_raise_config_error(kw, match):
    with pytest.raises(ConfigError, match=re.escape(match) if "=" in match else match):
        UNetConfig(**kw)


def test_bad_inputs_and_state_dicts_raise_data_error():
    params = {"params": {}}  # every check runs before the first parameter is read
    x, t, y = _inputs(TINY, H=8)
    net = UNet(TINY)
    with pytest.raises(DataError, match="divisible by 2; got 7x8"):
        net.apply(params, x[:, :7], t, y)
    with pytest.raises(DataError, match=r"\[B, H, W, C=2\]"):
        net.apply(params, x[..., :1], t, y)
    with pytest.raises(DataError, match="timesteps"):
        net.apply(params, x, np.zeros(3), y)
    with pytest.raises(DataError, match="labels"):
        net.apply(params, x, t, y[:1])
    plain = dataclasses.replace(TINY, num_classes=0)
    with pytest.raises(DataError, match="num_classes=0"):
        UNet(plain).apply(params, x, t, y)
    with pytest.raises(DataError, match="missing"):
        from_diffusers({"conv_in.weight": np.zeros((16, 2, 3, 3))}, TINY)
