"""The DDPM UNet (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Sec. 4 and App. B),
built layer for layer as Hugging Face diffusers' `UNet2DModel`, so that parameter counts agree and
diffusers weights port over (`from_diffusers`) and give the same outputs.

The network, as diffusers builds it (unets/unet_2d.py, unet_2d_blocks.py, resnet.py):
  * sinusoidal timestep features (Vaswani et al. 2017, Sec. 3.5; cos first, frequency shift 0)
    -> Dense(4C0) -> SiLU -> Dense(4C0): the time embedding E, plus an optional class embedding;
  * conv_in, then one down block per level: `layers_per_block` ResNet blocks (GroupNorm, SiLU,
    conv3x3, + Dense(SiLU(E)), GroupNorm, SiLU, dropout, conv3x3, 1x1 shortcut when channels
    change; He et al. 2016 with Wu & He 2018 GroupNorm), each followed by self-attention on levels
    that have it, and a stride-2 conv3x3 downsample on all but the last level;
  * a mid block ResNet -> attention -> ResNet;
  * one up block per level, deepest first, of `layers_per_block + 1` ResNet blocks (+ attention),
    each reading one skip activation, popped last-in first-out, concatenated on channels; nearest
    x2 upsample + conv3x3 on all but the top level (computed as one 2x2 conv by output phase);
  * GroupNorm -> SiLU -> conv_out.
Attention is single-block spatial self-attention over the H*W positions with a residual
connection (Ho et al. 2020, App. B; Wang et al. 2018 non-local blocks), in heads of
`attention_head_dim` channels.

Flax names mirror diffusers' state_dict keys with "." before a list index written "_"
(`down_blocks.0.resnets.1.conv1.weight` <-> `down_blocks_0/resnets_1/conv1/kernel`), which is all
`from_diffusers` needs to know. Layout is NHWC (diffusers is NCHW).

Shape letters: B batch, H height, W width, C channels (I input, O output channels of a layer),
E time-embedding width (4 * block_out_channels[0]), F sinusoidal features (block_out_channels[0]),
Q = F // 2 frequencies, T = H * W attention positions, N heads, D head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from zoo.errors import ConfigError, DataError
from zoo.nn.dense import Dense
from zoo.nn.embeddings import timestep_embedding  # noqa: F401  (public here too)
from zoo.ops.attention import dot_product_attention

NORM_EPS = 1e-5  # diffusers UNet2DModel's norm_eps, for every GroupNorm


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 1  # image channels in
    out_channels: int | None = None  # channels out (eps prediction); None = in_channels
    block_out_channels: tuple[int, ...] = (64, 128)  # channels per resolution level, top first
    layers_per_block: int = 2  # ResNet blocks per down block (up blocks have one more)
    attention_levels: tuple[bool, ...] = (False, True)  # self-attention after each ResNet, per level
    attention_head_dim: int = 8  # channels per attention head (diffusers' attention_head_dim)
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    dropout: float = 0.0  # dropout inside every ResNet block (DDPM CIFAR-10 used 0.1)
    num_classes: int = 0  # > 0: class-conditional; label num_classes means "no label" (for CFG)
    dtype: Any = None  # compute dtype, e.g. jnp.bfloat16; params stay float32

    def __post_init__(self):
        # lists from a config file become tuples, so the config stays hashable
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))
        chans, G, D = self.block_out_channels, self.norm_num_groups, self.attention_head_dim
        positive = {"in_channels": self.in_channels, "layers_per_block": self.layers_per_block,
                    "norm_num_groups": G, "attention_head_dim": D,
                    "out_channels": 1 if self.out_channels is None else self.out_channels}
        for name, v in positive.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"UNetConfig.{name} must be a positive int; got {v!r}")
        if not chans or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in chans):
            raise ConfigError(f"UNetConfig.block_out_channels must be a non-empty tuple of positive "
                              f"ints; got {chans!r}")
        if len(self.attention_levels) != len(chans):
            raise ConfigError(f"UNetConfig.attention_levels needs one bool per level "
                              f"({len(chans)}, as block_out_channels={chans}); got {self.attention_levels}")
        if any(c % G for c in chans):
            raise ConfigError(f"every block_out_channels entry must be divisible by norm_num_groups={G}; "
                              f"got {chans}")
        attended = {c for c, a in zip(chans, self.attention_levels) if a} | {chans[-1]}  # + mid block
        if any(c % D for c in attended):
            raise ConfigError(f"channels of attention levels and of the mid block {sorted(attended)} must "
                              f"be divisible by attention_head_dim={D}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"UNetConfig.dropout must be in [0, 1); got {self.dropout!r}")
        K = self.num_classes
        if isinstance(K, bool) or not isinstance(K, int) or K < 0:
            raise ConfigError(f"UNetConfig.num_classes must be an int >= 0; got {self.num_classes!r}")

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)


# Ho et al. 2020 App. B, as diffusers' docs build it: 35,746,307 parameters
DDPM_CIFAR10 = UNetConfig(in_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                          attention_levels=(False, True, False, False), norm_num_groups=32, dropout=0.1)


def _norm(cfg: UNetConfig, name: str) -> nn.GroupNorm:
    # One-pass statistics (E[x^2] - E[x]^2, in float32): on CPU the two-pass variance costs a third
    # of the UNet's forward (unet-small32 B8: 208 -> 155 ms; no norm at all: 142 ms). torch uses
    # two passes; the outputs differ by ~3e-6 here, far inside the ported-weights tolerance (1e-4).
    return nn.GroupNorm(num_groups=cfg.norm_num_groups, epsilon=NORM_EPS, dtype=cfg.dtype,
                        use_fast_variance=True, name=name)


def _conv(features: int, size: int, cfg: UNetConfig, name: str, stride: int = 1) -> nn.Conv:
    # explicit symmetric padding: "SAME" would pad stride-2 convs (0, 1), torch pads (1, 1)
    pad = (size - 1) // 2
    return nn.Conv(features, (size, size), strides=stride, padding=((pad, pad), (pad, pad)),
                   dtype=cfg.dtype, name=name)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D (time_embedding_norm="default", output_scale_factor 1)."""

    cfg: UNetConfig
    out_channels: int

    @nn.compact
    def __call__(self, x_BxHxWxI, temb_BxE, deterministic: bool = True):
        cfg, O = self.cfg, self.out_channels
        h_BxHxWxO = _conv(O, 3, cfg, "conv1")(nn.silu(_norm(cfg, "norm1")(x_BxHxWxI)))
        t_BxO = nn.Dense(O, dtype=cfg.dtype, name="time_emb_proj")(nn.silu(temb_BxE))
        h_BxHxWxO = nn.silu(_norm(cfg, "norm2")(h_BxHxWxO + t_BxO[:, None, None, :]))
        h_BxHxWxO = nn.Dropout(cfg.dropout)(h_BxHxWxO, deterministic=deterministic)
        h_BxHxWxO = _conv(O, 3, cfg, "conv2")(h_BxHxWxO)
        if x_BxHxWxI.shape[-1] != O:
            x_BxHxWxI = _conv(O, 1, cfg, "conv_shortcut")(x_BxHxWxI)
        return x_BxHxWxI + h_BxHxWxO


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual: x + out(attn(GroupNorm(x))) (diffusers' Attention with
    residual_connection=True, norm_num_groups, bias=True; no attention dropout)."""

    cfg: UNetConfig

    @nn.compact
    def __call__(self, x_BxHxWxC):
        cfg = self.cfg
        B, H, W, C = x_BxHxWxC.shape
        D = cfg.attention_head_dim
        h_BxTxC = _norm(cfg, "group_norm")(x_BxHxWxC).reshape(B, H * W, C)
        q, k, v = (Dense(C, dtype=cfg.dtype, name=f"to_{n}")(h_BxTxC).reshape(B, H * W, C // D, D)
                   for n in "qkv")
        o_BxTxNxD = dot_product_attention(q, k, v)  # scale 1/sqrt(D), as torch's SDPA
        o_BxTxC = Dense(C, dtype=cfg.dtype, name="to_out_0")(o_BxTxNxD.reshape(B, H * W, C))
        return x_BxHxWxC + o_BxTxC.reshape(B, H, W, C)


class Downsample(nn.Module):
    """diffusers' Downsample2D(use_conv=True, padding=1): conv3x3 with stride 2."""

    cfg: UNetConfig

    @nn.compact
    def __call__(self, x_BxHxWxC):
        return _conv(x_BxHxWxC.shape[-1], 3, self.cfg, "conv", stride=2)(x_BxHxWxC)


# Nearest x2 then conv3x3, by output phase. Output pixel (2i + a, 2j + b) of the conv on the
# upsampled map reads input rows i-1, i, i (a = 0) or i, i, i+1 (a = 1), and columns alike, so
# each phase (a, b) is a 2x2 conv of the input with the 3x3 taps summed: kernel rows
# UP_PHASE_TAPS[a] @ [w_0, w_1, w_2] (and columns). All four phases are one 2x2 conv (VALID, on
# the input padded by 1) with 4 * O outputs, phase (a, b) read at offset (a, b): 16 (H+1) (W+1) I O
# multiply-adds instead of 36 H W I O, and no 4x upsampled copy of the input in memory.
UP_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]],    # a = 0: rows i-1 <- w_0; i <- w_1 + w_2
                          [[1, 1, 0], [0, 0, 1]]],   # a = 1: rows i <- w_0 + w_1; i+1 <- w_2
                         np.float32)


def nearest_up2_conv3x3(x_BxHxWxI, kernel_3x3xIxO, bias_O=None):
    """conv3x3(nearest_upsample_x2(x)), padding 1, as one 2x2 conv by output phase (see
    UP_PHASE_TAPS): [B, H, W, I] -> [B, 2H, 2W, O], in x's dtype."""
    B, H, W, _ = x_BxHxWxI.shape
    O = kernel_3x3xIxO.shape[-1]
    taps = jnp.asarray(UP_PHASE_TAPS)
    k = jnp.einsum("arx,bsy,xyio->rsiabo", taps, taps, kernel_3x3xIxO.astype(jnp.float32))
    k_2x2xIx4O = k.reshape(2, 2, k.shape[2], 4 * O).astype(x_BxHxWxI.dtype)
    x_pad = jnp.pad(x_BxHxWxI, ((0, 0), (1, 1), (1, 1), (0, 0)))
    z = jax.lax.conv_general_dilated(x_pad, k_2x2xIx4O, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    z = z.reshape(B, H + 1, W + 1, 2, 2, O)
    y = jnp.stack([jnp.stack([z[:, a:a + H, b:b + W, a, b] for b in (0, 1)], 3) for a in (0, 1)], 2)
    y = y.reshape(B, 2 * H, 2 * W, O)
    return y if bias_O is None else y + bias_O.astype(y.dtype)


class _UpConv(nn.Module):
    """The parameters of nn.Conv(O, (3, 3)) (same names, shapes and initialisers, so diffusers'
    weights port as before), applied by nearest_up2_conv3x3."""

    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x_BxHxWxI):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, x_BxHxWxI.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        dtype = self.dtype or jnp.result_type(x_BxHxWxI, kernel)
        return nearest_up2_conv3x3(x_BxHxWxI.astype(dtype), kernel, bias)


class Upsample(nn.Module):
    """diffusers' Upsample2D(use_conv=True): nearest-neighbour x2, then conv3x3 (computed by
    output phase, nearest_up2_conv3x3)."""

    cfg: UNetConfig

    @nn.compact
    def __call__(self, x_BxHxWxC):
        return _UpConv(x_BxHxWxC.shape[-1], self.cfg.dtype, name="conv")(x_BxHxWxC)


class DownBlock(nn.Module):
    """DownBlock2D / AttnDownBlock2D of one level; returns (h, the skip activations it adds)."""

    cfg: UNetConfig
    level: int

    @nn.compact
    def __call__(self, h_BxHxWxC, temb_BxE, deterministic: bool = True):
        cfg = self.cfg
        O, attend = cfg.block_out_channels[self.level], cfg.attention_levels[self.level]
        skips = []
        for j in range(cfg.layers_per_block):
            h_BxHxWxC = ResnetBlock(cfg, O, name=f"resnets_{j}")(h_BxHxWxC, temb_BxE, deterministic)
            if attend:
                h_BxHxWxC = AttentionBlock(cfg, name=f"attentions_{j}")(h_BxHxWxC)
            skips.append(h_BxHxWxC)
        if self.level < cfg.levels - 1:
            h_BxHxWxC = Downsample(cfg, name="downsamplers_0")(h_BxHxWxC)
            skips.append(h_BxHxWxC)
        return h_BxHxWxC, skips


class MidBlock(nn.Module):
    """UNetMidBlock2D: ResNet -> attention -> ResNet at the deepest level."""

    cfg: UNetConfig

    @nn.compact
    def __call__(self, h_BxHxWxC, temb_BxE, deterministic: bool = True):
        C = h_BxHxWxC.shape[-1]
        h_BxHxWxC = ResnetBlock(self.cfg, C, name="resnets_0")(h_BxHxWxC, temb_BxE, deterministic)
        h_BxHxWxC = AttentionBlock(self.cfg, name="attentions_0")(h_BxHxWxC)
        return ResnetBlock(self.cfg, C, name="resnets_1")(h_BxHxWxC, temb_BxE, deterministic)


class UpBlock(nn.Module):
    """UpBlock2D / AttnUpBlock2D of one level: each ResNet reads the last unread skip."""

    cfg: UNetConfig
    level: int

    @nn.compact
    def __call__(self, h_BxHxWxC, skips, temb_BxE, deterministic: bool = True):
        cfg = self.cfg
        O, attend = cfg.block_out_channels[self.level], cfg.attention_levels[self.level]
        for j, skip in enumerate(reversed(skips)):
            h_BxHxWxC = jnp.concatenate([h_BxHxWxC, skip.astype(h_BxHxWxC.dtype)], axis=-1)
            h_BxHxWxC = ResnetBlock(cfg, O, name=f"resnets_{j}")(h_BxHxWxC, temb_BxE, deterministic)
            if attend:
                h_BxHxWxC = AttentionBlock(cfg, name=f"attentions_{j}")(h_BxHxWxC)
        if self.level > 0:
            h_BxHxWxC = Upsample(cfg, name="upsamplers_0")(h_BxHxWxC)
        return h_BxHxWxC


class TimeEmbedding(nn.Module):
    """diffusers' TimestepEmbedding: Dense -> SiLU -> Dense."""

    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, f_BxF):
        h_BxE = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(f_BxF))
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(h_BxE)


def _check_inputs(cfg: UNetConfig, x_BxHxWxC, t_B, label_B):
    """Shape errors a caller can make, as DataError; returns t broadcast to [B]."""
    if x_BxHxWxC.ndim != 4 or x_BxHxWxC.shape[-1] != cfg.in_channels:
        raise DataError(f"UNet input must be [B, H, W, C={cfg.in_channels}] (NHWC); got shape "
                        f"{tuple(x_BxHxWxC.shape)}")
    B, H, W, _ = x_BxHxWxC.shape
    m = 2 ** (cfg.levels - 1)
    if H % m or W % m:
        raise DataError(f"UNet with {cfg.levels} levels needs H and W divisible by {m}; got {H}x{W}")
    t_B = jnp.asarray(t_B)
    if t_B.ndim > 1 or (t_B.ndim == 1 and t_B.shape[0] not in (1, B)):
        raise DataError(f"timesteps must be a scalar or of shape [B={B}]; got {tuple(t_B.shape)}")
    if label_B is not None:
        if not cfg.num_classes:
            raise DataError("labels given to a UNet with num_classes=0; set num_classes > 0 for "
                            "class conditioning")
        if jnp.shape(label_B) != (B,):
            raise DataError(f"labels must be of shape [B={B}]; got {tuple(jnp.shape(label_B))}")
    return jnp.broadcast_to(t_B, (B,))


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]): NHWC image and timesteps (and labels) -> float32 NHWC output.

    t_B: int or float timesteps, [B] or a scalar. label_B: ints in [0, num_classes], where
    num_classes (or label_B=None) is the unconditional row. Dropout needs a "dropout" rng when
    deterministic=False.
    """

    cfg: UNetConfig

    @nn.compact
    def __call__(self, x_BxHxWxC, t_B, label_B=None, *, deterministic: bool = True):
        cfg = self.cfg
        t_B = _check_inputs(cfg, x_BxHxWxC, t_B, label_B)
        C0, E = cfg.block_out_channels[0], 4 * cfg.block_out_channels[0]
        temb_BxE = TimeEmbedding(E, cfg.dtype, name="time_embedding")(timestep_embedding(t_B, C0))
        if cfg.num_classes:
            label_B = (jnp.full(t_B.shape, cfg.num_classes, jnp.int32) if label_B is None
                       else jnp.asarray(label_B, jnp.int32))
            embed = nn.Embed(cfg.num_classes + 1, E, dtype=cfg.dtype, name="class_embedding")
            temb_BxE = temb_BxE + embed(label_B)

        h_BxHxWxC = _conv(C0, 3, cfg, "conv_in")(x_BxHxWxC)
        skips = [h_BxHxWxC]
        for level in range(cfg.levels):
            down = DownBlock(cfg, level, name=f"down_blocks_{level}")
            h_BxHxWxC, added = down(h_BxHxWxC, temb_BxE, deterministic)
            skips += added
        h_BxHxWxC = MidBlock(cfg, name="mid_block")(h_BxHxWxC, temb_BxE, deterministic)
        n = cfg.layers_per_block + 1  # skips read per up block; they add up to len(skips)
        for i, level in enumerate(reversed(range(cfg.levels))):
            up = UpBlock(cfg, level, name=f"up_blocks_{i}")
            h_BxHxWxC = up(h_BxHxWxC, skips[-n:], temb_BxE, deterministic)
            skips = skips[:-n]
        h_BxHxWxC = nn.silu(_norm(cfg, "conv_norm_out")(h_BxHxWxC))
        eps_BxHxWxC = _conv(cfg.out_channels or cfg.in_channels, 3, cfg, "conv_out")(h_BxHxWxC)
        return eps_BxHxWxC.astype(jnp.float32)


def param_shapes(cfg: UNetConfig) -> dict:
    """The params tree of UNet(cfg) as jax.ShapeDtypeStructs (traced with eval_shape, no allocation)."""
    m = 2 ** (cfg.levels - 1)
    x = jnp.zeros((1, m, m, cfg.in_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    return jax.eval_shape(UNet(cfg).init, jax.random.key(0), x, t)["params"]


def diffusers_kwargs(cfg: UNetConfig) -> dict:
    """Keyword arguments of diffusers' UNet2DModel that build the same network as UNet(cfg)."""
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels or cfg.in_channels,
                block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                down_block_types=down, up_block_types=up, mid_block_type="UNetMidBlock2D",
                attention_head_dim=cfg.attention_head_dim, norm_num_groups=cfg.norm_num_groups,
                norm_eps=NORM_EPS, dropout=cfg.dropout, act_fn="silu",
                time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
                resnet_time_scale_shift="default", downsample_padding=1, add_attention=True,
                num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None)


def _flax_path(key: str) -> tuple[str, ...]:
    """'down_blocks.0.resnets.1.conv1' -> ('down_blocks_0', 'resnets_1', 'conv1')."""
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _to_flax(value: np.ndarray, leaf: str) -> np.ndarray:
    """torch layout -> flax layout: conv OIHW -> HWIO, Linear [out, in] -> [in, out]."""
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def from_diffusers(state_dict: Mapping[str, Any], cfg: UNetConfig) -> dict:
    """UNet(cfg) params from a diffusers UNet2DModel state_dict (name -> numpy array or torch tensor).

    Returns the "params" collection (apply with {"params": params}), float32 NumPy arrays.
    """
    expected = traverse_util.flatten_dict(param_shapes(cfg))
    flat, unexpected, mismatched = {}, [], []
    for key, value in state_dict.items():
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().float().cpu().numpy()
        value = np.asarray(value, np.float32)
        *module, leaf = key.split(".")
        if leaf == "weight":  # the one torch name for what flax calls kernel, scale or embedding
            leaf = next((n for n in ("kernel", "scale", "embedding")
                         if _flax_path(".".join(module)) + (n,) in expected), "kernel")
        path = _flax_path(".".join(module)) + (leaf,)
        if path not in expected:
            unexpected.append(key)
            continue
        value = _to_flax(value, leaf)
        if value.shape != expected[path].shape:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(expected[path].shape)}")
        flat[path] = value
    missing = ["/".join(p) for p in expected if p not in flat]
    problems = [f"{what} ({len(names)}): {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                for what, names in (("missing (flax names)", missing), ("unexpected", unexpected),
                                    ("shape mismatch, flax layout", mismatched)) if names]
    if problems:
        raise DataError("diffusers state_dict does not fit this UNetConfig (diffusers_kwargs(cfg) "
                        "builds one that does): " + "; ".join(problems))
    return traverse_util.unflatten_dict(flat)
