"""`dit`: the Diffusion Transformer (Peebles & Xie 2023) as the denoiser of the same diffusion recipe
as `ddpm` (zoo.models.ddpm.make_diffusion: loss, label dropout, guided DDPM/DDIM/DPM-Solver
sampling, EMA). The network is zoo.nn.dit.DiT: patchify, adaLN-Zero blocks, unpatchify.

Shape letters: as in zoo.nn.dit.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from zoo.errors import ConfigError, unknown
from zoo.models.base import ModelDef
from zoo.models.ddpm import DiffusionConfig, diffusion_defaults, make_diffusion, split_model_cfg
from zoo.nn.dit import DiT, DiTConfig
from zoo.registry import register
from zoo.train.config import base_config, transformer_optimizer

DIT_KEYS = ("patch_size", "width", "depth", "num_heads", "mlp_ratio", "dtype")


def make_dit(dcfg: DiffusionConfig, *, patch_size=2, width=128, depth=6, num_heads=4, mlp_ratio=4.0,
             dtype="float32") -> ModelDef:
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(unknown("dtype", dtype, ("float32", "bfloat16")))
    net = DiT(DiTConfig(tuple(dcfg.image_shape), int(patch_size), int(width), int(depth), int(num_heads),
                        float(mlp_ratio), dcfg.num_classes, jnp.bfloat16 if dtype == "bfloat16" else None))

    def init_net(key, x):
        label = jnp.zeros((1,), jnp.int32) if dcfg.num_classes else None
        return net.init(key, x, jnp.zeros((1,), jnp.int32), label)["params"]

    def apply(params, x, t_B, label, dropout_key):
        del dropout_key  # DiT has no dropout
        return net.apply({"params": params}, x, t_B, label)

    return make_diffusion(dcfg, init_net, apply)


def dit_config() -> ml_collections.ConfigDict:
    # Sized for the 8x8 digits on a CPU: 0.33M parameters, ~0.15 s per step of 64 on 2 cores.
    c = base_config()
    c.data.name = "digits"
    c.batch_size = 64
    c.steps = 4000
    transformer_optimizer(c, lr=1e-3, warmup_steps=200, weight_decay=0.0)
    c.optimizer.schedule = "constant"   # DiT trains at a constant rate (the paper: 1e-4, no decay)
    c.ema_decay = 0.999
    c.log_every = 50
    c.ckpt_every = 1000
    c.model = ml_collections.ConfigDict(dict(diffusion_defaults(), **{
        "patch_size": 2,       # p: 8x8 digits -> 16 tokens
        "width": 64,           # D
        "depth": 4,            # DiT blocks
        "num_heads": 4,        # attention heads
        "mlp_ratio": 4.0,      # MLP width / D
        "dtype": "float32",    # compute dtype: float32 | bfloat16 (params stay f32)
    }))
    return c


@register("dit", "DiT: Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie 2023)", dit_config)
def build_dit(model_cfg, info) -> ModelDef:
    dcfg, net_kwargs = split_model_cfg(model_cfg, DIT_KEYS, info)
    return make_dit(dcfg, **net_kwargs)
