"""Vision Transformer classifier (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

Eq. 1-4 of the paper: the image is cut into non-overlapping p x p patches, each flattened and
linearly embedded; a learned [CLS] token is prepended and a learned position embedding added; a
pre-LayerNorm Transformer encoder (zoo.nn.transformer.Stack, non-causal, final LayerNorm) runs over
the T = N + 1 tokens; a linear head on the [CLS] output gives the class logits. The head starts at
zero (the paper's fine-tuning head; big_vision's ViT does the same), so training starts at log K.

Training-only regularisers, both drawn per example from (key, batch["idx"]) (zoo.ops.random), so
jit on any mesh and pmap give the same numbers: random translation by up to `augment_shift` pixels
(zero padding: the digits' background is 0) and dropout inside the Transformer blocks.
`evaluate` is deterministic: no augmentation, no dropout.

Shape letters: B batch, Y image rows, X image columns, C channels, p patch size, N patches
(Y/p * X/p), P patch features (p * p * C), T tokens (N + 1), D model width, K classes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from zoo.errors import ConfigError, DataError, unknown
from zoo.models.base import ModelDef
from zoo.nn.dense import Dense
from zoo.nn.transformer import INIT_STD, Stack
from zoo.ops import losses
from zoo.ops.random import example_keys
from zoo.registry import register
from zoo.train.config import base_config, transformer_optimizer


def patchify(x_BxYxXxC: jax.Array, p: int) -> jax.Array:
    """Non-overlapping p x p patches, row-major over the patch grid, each flattened (row, col, channel)."""
    B, Y, X, C = x_BxYxXxC.shape
    x = x_BxYxXxC.reshape(B, Y // p, p, X // p, p, C)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(B, (Y // p) * (X // p), p * p * C)


def random_shift(key: jax.Array, x_YxXxC: jax.Array, max_shift: int) -> jax.Array:
    """One image translated by (dy, dx) uniform in [-max_shift, max_shift]^2, zeros shifted in."""
    Y, X, C = x_YxXxC.shape
    padded = jnp.pad(x_YxXxC, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    dy, dx = jax.random.randint(key, (2,), 0, 2 * max_shift + 1)
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), (Y, X, C))


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_shape: tuple[int, int, int]  # (Y, X, C) of one example, from the data
    num_classes: int                   # K, from the data
    patch_size: int = 2                # p: Y and X must be multiples of it
    width: int = 64                    # D
    num_layers: int = 4
    num_heads: int = 4                 # D must be a multiple of it
    mlp_ratio: float = 2.0             # MLP width = mlp_ratio * D
    dropout: float = 0.0               # on the embeddings and every residual branch (training only)
    pos_embedding: bool = True         # learned position embedding; off = a bag of patches
    augment_shift: int = 0             # training-only random translation, in pixels
    label_smoothing: float = 0.0       # of the training loss; `evaluate`'s nll is the plain one

    def __post_init__(self):
        if len(self.image_shape) != 3 or any(int(d) <= 0 for d in self.image_shape):
            raise ConfigError(f"vit needs images [Y, X, C] with positive sizes; got per-example shape "
                              f"{tuple(self.image_shape)}")
        Y, X, _ = self.image_shape
        p = int(self.patch_size)
        if p < 1 or Y % p or X % p:
            valid = [d for d in range(1, min(Y, X) + 1) if Y % d == 0 and X % d == 0]
            raise ConfigError(f"image size {Y}x{X} is not divisible by patch_size {self.patch_size}; "
                              f"valid: {', '.join(map(str, valid))}")
        if int(self.num_classes) < 2:
            raise ConfigError(f"vit needs num_classes >= 2 (labelled data), got {self.num_classes}")
        for name in ("width", "num_layers", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ConfigError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= int(self.augment_shift) < min(Y, X):
            raise ConfigError(f"augment_shift must be in [0, {min(Y, X)}), got {self.augment_shift}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def num_patches(self) -> int:
        Y, X, _ = self.image_shape
        return (Y // self.patch_size) * (X // self.patch_size)


class ViT(nn.Module):
    """images [B, Y, X, C] -> (logits [B, K], {"tokens": [B, T, D] encoder output})."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x_BxYxXxC, *, deterministic: bool = True):
        cfg = self.cfg
        patches_BxNxP = patchify(x_BxYxXxC.astype(jnp.float32), cfg.patch_size)
        B = patches_BxNxP.shape[0]
        emb_BxNxD = Dense(cfg.width, name="embed")(patches_BxNxP)  # eq. 1: x_p^i E
        cls_1x1xD = self.param("cls", nn.initializers.zeros, (1, 1, cfg.width))
        h_BxTxD = jnp.concatenate([jnp.broadcast_to(cls_1x1xD, (B, 1, cfg.width)), emb_BxNxD], axis=1)
        if cfg.pos_embedding:
            pos_1xTxD = self.param("pos", nn.initializers.normal(INIT_STD), (1, cfg.num_patches + 1, cfg.width))
            h_BxTxD = h_BxTxD + pos_1xTxD
        h_BxTxD = nn.Dropout(cfg.dropout)(h_BxTxD, deterministic=deterministic)
        h_BxTxD, _ = Stack(cfg.num_layers, cfg.num_heads, cfg.num_heads, cfg.mlp_ratio, causal=False,
                           dropout=cfg.dropout, name="encoder")(h_BxTxD, deterministic=deterministic)
        logits_BxK = nn.Dense(cfg.num_classes, kernel_init=nn.initializers.zeros, name="head")(h_BxTxD[:, 0])
        return logits_BxK, {"tokens": h_BxTxD}


def _check_batch(cfg: ViTConfig, batch) -> tuple[jax.Array, jax.Array]:
    x = batch["x"]
    if tuple(x.shape[1:]) != tuple(cfg.image_shape):
        raise DataError(f"batch['x'] has per-example shape {tuple(x.shape[1:])}; vit expects {cfg.image_shape}")
    if "label" not in batch:
        raise DataError("vit is a classifier: the data needs a 'label' array (e.g. data.name=digits)")
    return x.astype(jnp.float32), batch["label"].astype(jnp.int32)


def make_vit(*, image_shape, num_classes, patch_size=2, width=64, num_layers=4, num_heads=4,
             mlp_ratio=2.0, dropout=0.0, pos_embedding=True, augment_shift=0,
             label_smoothing=0.0) -> ModelDef:
    """ViT classifier as a ModelDef; loss = mean cross-entropy (nats) of the training batch."""
    cfg = ViTConfig(tuple(int(d) for d in image_shape), int(num_classes), int(patch_size), int(width),
                    int(num_layers), int(num_heads), float(mlp_ratio), float(dropout),
                    bool(pos_embedding), int(augment_shift), float(label_smoothing))
    net = ViT(cfg)

    def init(key, batch):
        x, _ = _check_batch(cfg, batch)
        return net.init(key, x[:1])["params"]

    def logits(params, x_BxYxXxC):
        return net.apply({"params": params}, x_BxYxXxC)[0]

    def train_logits(params, key, batch):
        """Per example: its own shift and dropout masks from fold_in(key, idx), whatever the split."""
        x, _ = _check_batch(cfg, batch)
        k_shift, k_drop = jax.random.split(key)
        if cfg.augment_shift:
            x = jax.vmap(random_shift, (0, 0, None))(example_keys(k_shift, batch["idx"]), x, cfg.augment_shift)
        if cfg.dropout == 0.0:
            return logits(params, x)
        one = lambda x_YxXxC, k: net.apply({"params": params}, x_YxXxC[None], deterministic=False,
                                           rngs={"dropout": k})[0][0]
        return jax.vmap(one)(x, example_keys(k_drop, batch["idx"]))

    def loss(params, key, batch):
        _, label_B = _check_batch(cfg, batch)
        logits_BxK = train_logits(params, key, batch)
        nll_B = losses.cross_entropy(logits_BxK, label_B)
        total_B = nll_B
        if cfg.label_smoothing:  # (1 - eps) * NLL + eps * mean over classes of -log p
            uniform_B = -jnp.mean(jax.nn.log_softmax(logits_BxK, axis=-1), axis=-1)
            total_B = (1 - cfg.label_smoothing) * nll_B + cfg.label_smoothing * uniform_B
        total = jnp.mean(total_B)
        accuracy = jnp.mean((jnp.argmax(logits_BxK, -1) == label_B).astype(jnp.float32))
        return total, {"loss": total, "nll": jnp.mean(nll_B), "accuracy": accuracy}

    def evaluate(params, key, batch):
        del key  # deterministic
        x, label_B = _check_batch(cfg, batch)
        logits_BxK = logits(params, x)
        return {"accuracy": (jnp.argmax(logits_BxK, -1) == label_B).astype(jnp.float32),
                "nll": losses.cross_entropy(logits_BxK, label_B)}

    return ModelDef(init=init, loss=loss, evaluate=evaluate)


# ---- registry ----

def vit_config() -> ml_collections.ConfigDict:
    # Chosen on a validation split carved from the train split (last 287 of the 1,437 digits; mean of
    # 3 seeds), never on the test split: patch 4 beat patch 2 (97.2% vs 90.9% at 1k steps, and 2x
    # faster), lr 3e-3 beat 1e-3, dropout 0.1 + 1-pixel shifts helped a little, 4k steps beat 2k
    # (val accuracy 99.2% vs 99.1%, val NLL 0.019 vs 0.034). experiments/results/vit_digits.md.
    c = base_config()
    c.data.name = "digits"
    c.batch_size = 128
    c.steps = 4000                 # ~360 epochs of the 1,437 training digits; ~2.5 CPU minutes
    transformer_optimizer(c, lr=3e-3, warmup_steps=200, weight_decay=0.05)
    c.log_every = 50
    c.ckpt_every = 2000
    c.model = ml_collections.ConfigDict({
        "patch_size": 4,          # p: 8x8 digits -> 4 patches of 4x4 (+ [CLS] = 5 tokens)
        "width": 64,              # D
        "num_layers": 4,          # Transformer blocks
        "num_heads": 4,           # attention heads (D / heads = 16 per head)
        "mlp_ratio": 2.0,         # MLP width / D
        "dropout": 0.1,           # residual-branch and embedding dropout (training only)
        "pos_embedding": True,    # learned position embedding (off: permutation-invariant patches)
        "augment_shift": 1,       # random translation by up to this many pixels (training only)
        "label_smoothing": 0.0,   # training loss only
    })
    return c


def _kwargs(model_cfg) -> dict[str, Any]:
    """ConfigDict -> make_vit kwargs; an unknown key is a ConfigError naming the valid ones."""
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    valid = sorted(set(make_vit.__kwdefaults__) - {"image_shape", "num_classes"})  # those come from the data
    for k in d:
        if k not in valid:
            raise ConfigError(unknown("model key", k, valid))
    return d


@register("vit", "Vision Transformer classifier: patches + [CLS] + Transformer encoder (Dosovitskiy et al. 2021)",
          vit_config)
def build_vit(model_cfg, info) -> ModelDef:
    if not info.get("num_classes"):
        raise ConfigError(f"vit is a classifier: data {info.get('name')!r} has no labels; use e.g. data.name=digits")
    return make_vit(image_shape=tuple(info["shape"]), num_classes=int(info["num_classes"]), **_kwargs(model_cfg))
