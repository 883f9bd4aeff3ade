"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

The structure follows the paper's Sec. 3.2 and Fig. 3, and the official code
(facebookresearch/DiT, models.py) for the details the paper leaves out:

  * Patchify (Sec. 3.2, Fig. 4): non-overlapping p x p patches, each linearly embedded to D, plus
    the fixed 2-D sine-cosine position embedding of ViT/MAE (`sincos_2d_positions`).
  * Conditioning c = timestep embedding + label embedding. The timestep embedding is the
    256-frequency sinusoid (`timestep_embedding`) -> Linear -> SiLU -> Linear; the label table has
    one extra row, index num_classes, meaning "no label", which classifier-free guidance
    (Sec. 3.1) needs as the null condition.
  * adaLN-Zero blocks (Sec. 3.2, "DiT block design"): LayerNorm without learned affine (eps 1e-6),
    modulated by shift/scale regressed from SiLU(c), with per-channel gates on the attention and
    MLP branches; the regressor starts at zero, so every block starts as the identity.
  * Transformer decoder (Sec. 3.2): adaLN (shift, scale), then a zero-initialised linear to
    p*p*C per token, then unpatchify. The model predicts eps only (no learned sigma).

Initialisation as the official `initialize_weights`: xavier_uniform linears with zero bias,
normal(0.02) for the label table and the timestep MLP, zeros for every adaLN regressor and the
final linear. A freshly initialised DiT therefore outputs exactly zero.

Shape letters: B batch, H image rows, W image columns, C channels, p patch size, N patches
(H/p * W/p), P patch features (p * p * C), D width, A attention heads, E head dim (D / A),
F MLP width, G timestep frequency features (256).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.errors import ConfigError, DataError
from zoo.nn.dense import Dense
from zoo.nn.embeddings import timestep_embedding  # noqa: F401  (public here too)
from zoo.ops.gelu import gelu_tanh
from zoo.ops.attention import dot_product_attention

FREQ_DIM = 256      # G: timestep frequency embedding size (official TimestepEmbedder)
EMBED_STD = 0.02    # label table and timestep MLP initialiser scale (official initialize_weights)
LN_EPS = 1e-6

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


# ------------------------------------------------------------------------------- pure helpers


def patchify(x_BxHxWxC: jax.Array, p: int) -> jax.Array:
    """[B, H, W, C] -> [B, N, P]: patches row-major over the grid, each flattened (row, col, channel)."""
    B, H, W, C = x_BxHxWxC.shape
    x = x_BxHxWxC.reshape(B, H // p, p, W // p, p, C)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x_BxNxP: jax.Array, p: int, H: int, W: int, C: int) -> jax.Array:
    """The inverse of `patchify`: [B, N, P] -> [B, H, W, C] (official `unpatchify`, channels last)."""
    B = x_BxNxP.shape[0]
    x = x_BxNxP.reshape(B, H // p, W // p, p, p, C)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, dim]: sin(pos * w_i) then cos(pos * w_i), w_i = 10000^(-2i/dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_positions(D: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [N, D] (float32), patches row-major as in `patchify`.

    As the official get_2d_sincos_pos_embed (from MAE): the first D/2 dims encode one grid
    coordinate and the last D/2 the other, each as `_sincos_1d`. Because the official code builds
    the grid with np.meshgrid(grid_w, grid_h), the first half encodes the column index and the
    second half the row index; we keep that order so official checkpoints' layout carries over.
    """
    if D % 4:
        raise ConfigError(f"2-D sin-cos positions need a width divisible by 4; got {D}")
    cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    emb = np.concatenate([_sincos_1d(D // 2, cols), _sincos_1d(D // 2, rows)], axis=1)
    return emb.astype(np.float32)


def modulate(x_BxNxD: jax.Array, shift_BxD: jax.Array, scale_BxD: jax.Array) -> jax.Array:
    """adaLN: x * (1 + scale) + shift, per example (scale is a residual so zero means identity)."""
    return x_BxNxD * (1 + scale_BxD[:, None]) + shift_BxD[:, None]


# ---------------------------------------------------------------------------------- layers


def _dense(features: int, dtype, name: str, init=_xavier, bias_init=_zeros) -> Dense:
    return Dense(features, kernel_init=init, bias_init=bias_init, dtype=dtype, name=name)


def _layer_norm(dtype, name: str) -> nn.LayerNorm:
    """LayerNorm without learned affine: adaLN supplies the scale and shift."""
    return nn.LayerNorm(LN_EPS, use_bias=False, use_scale=False, dtype=dtype, name=name)


class TimestepEmbedder(nn.Module):
    """t [B] -> [B, D]: frequency embedding (G = 256) -> Linear -> SiLU -> Linear."""

    width: int
    freq_dim: int = FREQ_DIM
    dtype: Any = None

    @nn.compact
    def __call__(self, t_B: jax.Array) -> jax.Array:
        init = nn.initializers.normal(EMBED_STD)
        h_BxD = _dense(self.width, self.dtype, "mlp_0", init)(timestep_embedding(t_B, self.freq_dim))
        return _dense(self.width, self.dtype, "mlp_2", init)(nn.silu(h_BxD))


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm's Attention, as DiT uses).

    Fused, not three projections, so xavier_uniform sees the official fan-out of 3D.
    """

    num_heads: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x_BxNxD: jax.Array) -> jax.Array:
        B, N, D = x_BxNxD.shape
        A = self.num_heads
        qkv_BxNx3xAxE = _dense(3 * D, self.dtype, "qkv")(x_BxNxD).reshape(B, N, 3, A, D // A)
        q, k, v = (qkv_BxNx3xAxE[:, :, i] for i in range(3))
        out_BxNxAxE = dot_product_attention(q, k, v)
        return _dense(D, self.dtype, "proj")(out_BxNxAxE.reshape(B, N, D))


class DiTBlock(nn.Module):
    """adaLN-Zero block (Sec. 3.2, Fig. 3): x + gate * branch(modulate(LN(x), shift, scale)), twice.

    The six modulation vectors come from SiLU(c) -> Linear(6D), initialised to zero, so the gates
    start at zero and the block starts as the identity ("Zero" in adaLN-Zero).
    """

    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x_BxNxD: jax.Array, c_BxD: jax.Array) -> jax.Array:
        D = x_BxNxD.shape[-1]
        mod_Bx6D = _dense(6 * D, self.dtype, "adaLN_modulation", _zeros)(nn.silu(c_BxD))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod_Bx6D, 6, axis=-1)
        h = modulate(_layer_norm(self.dtype, "norm1")(x_BxNxD), shift_msa, scale_msa)
        x_BxNxD = x_BxNxD + gate_msa[:, None] * SelfAttention(self.num_heads, self.dtype, name="attn")(h)
        h = modulate(_layer_norm(self.dtype, "norm2")(x_BxNxD), shift_mlp, scale_mlp)
        h = _dense(int(D * self.mlp_ratio), self.dtype, "fc1")(h)          # F = D * mlp_ratio
        h = _dense(D, self.dtype, "fc2")(gelu_tanh(h))    # official: GELU (tanh)
        return x_BxNxD + gate_mlp[:, None] * h


class FinalLayer(nn.Module):
    """The Transformer decoder (Sec. 3.2): adaLN (shift, scale) then a zero-initialised Linear(P)."""

    out_features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x_BxNxD: jax.Array, c_BxD: jax.Array) -> jax.Array:
        D = x_BxNxD.shape[-1]
        mod_Bx2D = _dense(2 * D, self.dtype, "adaLN_modulation", _zeros)(nn.silu(c_BxD))
        shift, scale = jnp.split(mod_Bx2D, 2, axis=-1)
        h = modulate(_layer_norm(self.dtype, "norm_final")(x_BxNxD), shift, scale)
        return _dense(self.out_features, self.dtype, "linear", _zeros)(h)


# ---------------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    image_shape: tuple[int, int, int]   # (H, W, C) of one example
    patch_size: int = 2                 # p: H and W must be multiples of it
    width: int = 128                    # D: a multiple of num_heads and of 4 (2-D sin-cos positions)
    depth: int = 6                      # number of DiT blocks
    num_heads: int = 4                  # A
    mlp_ratio: float = 4.0              # F = int(D * mlp_ratio)
    num_classes: int = 0                # > 0: label table of num_classes + 1 rows; the last = no label
    dtype: Any = None                   # compute dtype (None: float32); params stay float32

    def __post_init__(self):
        shape = tuple(self.image_shape)
        if len(shape) != 3 or any(int(d) < 1 for d in shape):
            raise ConfigError(f"dit needs image_shape (H, W, C) with positive sizes; got {shape}")
        H, W, _ = shape
        p = int(self.patch_size)
        if p < 1 or H % p or W % p:
            valid = [d for d in range(1, min(H, W) + 1) if H % d == 0 and W % d == 0]
            raise ConfigError(f"image size {H}x{W} is not divisible by patch_size {self.patch_size}; "
                              f"valid: {', '.join(map(str, valid))}")
        for name in ("width", "depth", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.num_heads:
            valid = [a for a in range(1, self.width + 1) if self.width % a == 0]
            raise ConfigError(f"width {self.width} is not a multiple of num_heads {self.num_heads}; "
                              f"valid num_heads: {', '.join(map(str, valid))}")
        if self.width % 4:
            raise ConfigError(f"width must be a multiple of 4 (2-D sin-cos positions), got {self.width}")
        if not self.mlp_ratio > 0 or int(self.width * self.mlp_ratio) < 1:
            raise ConfigError(f"mlp_ratio must be > 0 with width * mlp_ratio >= 1, got {self.mlp_ratio}")
        if int(self.num_classes) < 0:
            raise ConfigError(f"num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")
        if self.dtype is not None and not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ConfigError(f"dtype must be None or a float dtype (float32, bfloat16, float16), "
                              f"got {self.dtype}")


def _check_inputs(cfg: DiTConfig, x, t, label):
    """Shape-check (x, t, label); t may be a scalar (broadcast); label None -> the null class."""
    x = jnp.asarray(x)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(cfg.image_shape):
        raise DataError(f"dit expects images [B, {', '.join(map(str, cfg.image_shape))}] "
                        f"(H, W, C = image_shape); got shape {tuple(x.shape)}")
    B = x.shape[0]
    t = jnp.asarray(t)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, (B,))
    if t.shape != (B,):
        raise DataError(f"dit expects timesteps t of shape [B] = ({B},) or a scalar; got {tuple(t.shape)}")
    if cfg.num_classes == 0:
        if label is not None:
            raise DataError("dit got labels but num_classes=0 (unconditional); set num_classes > 0 "
                            "or pass label=None")
        return x, t, None
    if label is None:
        return x, t, jnp.full((B,), cfg.num_classes, jnp.int32)
    label = jnp.asarray(label)
    if label.shape != (B,) or not jnp.issubdtype(label.dtype, jnp.integer):
        raise DataError(f"dit expects integer labels of shape [B] = ({B},) in [0, {cfg.num_classes}] "
                        f"({cfg.num_classes} = no label); got {label.dtype} {tuple(label.shape)}")
    return x, t, label


class DiT(nn.Module):
    """(x [B, H, W, C], t [B], label [B] or None) -> predicted eps [B, H, W, C], float32."""

    cfg: DiTConfig

    @nn.compact
    def __call__(self, x_BxHxWxC, t_B, label_B=None) -> jax.Array:
        cfg = self.cfg
        x_BxHxWxC, t_B, label_B = _check_inputs(cfg, x_BxHxWxC, t_B, label_B)
        (H, W, C), p, D = cfg.image_shape, cfg.patch_size, cfg.width
        patches_BxNxP = patchify(x_BxHxWxC.astype(jnp.float32), p)
        # The float32 position table keeps the residual stream float32 under a bf16 compute dtype
        # (as torch autocast does with DiT's float32 pos_embed); branches compute in cfg.dtype.
        pos_NxD = jnp.asarray(sincos_2d_positions(D, H // p, W // p))
        x_BxNxD = _dense(D, cfg.dtype, "x_embedder")(patches_BxNxP) + pos_NxD
        c_BxD = TimestepEmbedder(D, dtype=cfg.dtype, name="t_embedder")(t_B)
        if cfg.num_classes:
            table = nn.Embed(cfg.num_classes + 1, D, dtype=cfg.dtype,
                             embedding_init=nn.initializers.normal(EMBED_STD), name="y_embedder")
            c_BxD = c_BxD + table(label_B)
        for i in range(cfg.depth):
            x_BxNxD = DiTBlock(cfg.num_heads, cfg.mlp_ratio, cfg.dtype, name=f"block_{i}")(x_BxNxD, c_BxD)
        out_BxNxP = FinalLayer(p * p * C, cfg.dtype, name="final_layer")(x_BxNxD, c_BxD)
        return unpatchify(out_BxNxP, p, H, W, C).astype(jnp.float32)
