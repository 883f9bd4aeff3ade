"""Denoising diffusion models for images: `ddpm` (a UNet denoiser, Ho et al. 2020) and the shared
recipe the `dit` model reuses with a Transformer denoiser.

Training (Ho et al. 2020, Alg. 1, the "simple" loss of eq. 14): x_0 scaled to [-1, 1], t uniform
in {0..T-1}, x_t = q_sample(x_0, t, eps), loss = mean ||target - net(x_t, t, y)||^2 where the target
is eps (`prediction="eps"`) or v = sqrt(abar) eps - sqrt(1 - abar) x_0 (`"v"`, Salimans & Ho 2022).
Class conditioning with label dropout (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance",
Alg. 1): with probability `label_dropout` the label is replaced by the null class K, so one network
learns eps(x, t, y) and eps(x, t, null); sampling mixes them with zoo.ops.diffusion's
`classifier_free_guidance`. Sampling uses the EMA weights when the run keeps them (`ema_decay`).
All randomness is drawn per example from (key, batch["idx"]), so every mesh and pmap agree.

Shape letters: B batch, H/W image rows/columns, C channels, K classes, N samples.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from zoo import xla
from zoo.errors import ConfigError, DataError, unknown
from zoo.models.base import ModelDef
from zoo.ops import diffusion as D
from zoo.ops.random import example_keys
from zoo.registry import register
from zoo.train.config import base_config

PREDICTIONS = ("eps", "v")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    image_shape: tuple[int, int, int]   # (H, W, C), from the data
    schedule: str = "linear"            # linear | cosine (zoo.ops.diffusion.SCHEDULES)
    num_timesteps: int = 1000           # T
    prediction: str = "eps"             # what the network predicts: eps | v
    num_classes: int = 0                # K > 0: class-conditional (the data must have K labels)
    label_dropout: float = 0.1          # P(label -> null class) in training, for guidance
    sampler: str = "ddpm"               # default of `zoo sample`: ddpm | ddim | dpm_solver
    sample_steps: int = 0               # default steps of ddim / dpm_solver; 0 = all T
    guidance: float = 1.0               # default classifier-free guidance scale (1 = none)
    clip_x0: bool = True                # clip the x_0 prediction to [-1, 1] while sampling

    def __post_init__(self):
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ConfigError(f"diffusion models need images [H, W, C]; got per-example shape {self.image_shape}")
        if self.schedule not in D.SCHEDULES:
            raise ConfigError(unknown("noise schedule", self.schedule, D.SCHEDULES))
        if self.prediction not in PREDICTIONS:
            raise ConfigError(unknown("prediction", self.prediction, PREDICTIONS))
        if self.sampler not in D.SAMPLERS:
            raise ConfigError(unknown("sampler", self.sampler, D.SAMPLERS))
        if int(self.num_timesteps) < 2:
            raise ConfigError(f"num_timesteps must be >= 2, got {self.num_timesteps}")
        if int(self.num_classes) < 0:
            raise ConfigError(f"num_classes must be >= 0, got {self.num_classes}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if not 0 <= int(self.sample_steps) <= int(self.num_timesteps):
            raise ConfigError(f"sample_steps must be in [0, {self.num_timesteps}], got {self.sample_steps}")


# A denoiser: apply(params, x_BxHxWxC, t_B, label_B or None, dropout_key or None) -> [B, H, W, C].
Apply = Callable[[Any, jax.Array, jax.Array, Any, Any], jax.Array]


def make_diffusion(cfg: DiffusionConfig, init_net: Callable[[jax.Array, jax.Array], Any], apply: Apply, *,
                   per_example_dropout: bool = False) -> ModelDef:
    """A ModelDef for any denoiser network: the loss, held-out loss, and guided sampling."""
    schedule = D.make_schedule(cfg.schedule, cfg.num_timesteps)
    K = int(cfg.num_classes)

    def check(batch):
        x = batch["x"]
        if tuple(x.shape[1:]) != tuple(cfg.image_shape):
            raise DataError(f"batch['x'] has per-example shape {tuple(x.shape[1:])}; the model expects "
                            f"{tuple(cfg.image_shape)}")
        if K and "label" not in batch:
            raise DataError(f"num_classes={K} needs labelled data (a 'label' array, e.g. data.name=digits)")
        return 2.0 * x.astype(jnp.float32) - 1.0   # [0, 1] -> [-1, 1]

    def init(key, batch):
        return init_net(key, check(batch)[:1])

    def noised(key, batch, *, train: bool):
        """(x_t, t, label, target, dropout keys): one independent draw per example."""
        x0 = check(batch)
        keys = jax.vmap(lambda k: jax.random.split(k, 4))(example_keys(key, batch["idx"]))
        t_B = jax.vmap(lambda k: jax.random.randint(k, (), 0, cfg.num_timesteps))(keys[:, 0])
        eps = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:]))(keys[:, 1])
        x_t = D.q_sample(schedule, x0, t_B, eps)
        label = None
        if K:
            label = batch["label"].astype(jnp.int32)
            if train and cfg.label_dropout:
                drop = jax.vmap(lambda k: jax.random.bernoulli(k, cfg.label_dropout))(keys[:, 2])
                label = jnp.where(drop, K, label)
        target = eps if cfg.prediction == "eps" else D.v_from_eps(schedule, x_t, t_B, eps)
        return x_t, t_B, label, target, keys[:, 3]

    def per_example_mse(params, key, batch, *, train):
        x_t, t_B, label, target, k_drop = noised(key, batch, train=train)
        if train and per_example_dropout:   # dropout masks per example, like the rest of the noise
            one = lambda x, t, y, k: apply(params, x[None], t[None], None if y is None else y[None], k)[0]
            pred = jax.vmap(one)(x_t, t_B, label, k_drop)
        else:
            pred = apply(params, x_t, t_B, label, None)
        return jnp.mean(jnp.square(pred.astype(jnp.float32) - target).reshape(len(t_B), -1), axis=1)

    def loss(params, key, batch):
        mse = jnp.mean(per_example_mse(params, key, batch, train=True))
        return mse, {"loss": mse}

    def evaluate(params, key, batch):
        """Held-out denoising MSE at uniformly drawn t (the training objective, without label dropout)."""
        return {"mse": per_example_mse(params, key, batch, train=False)}

    def eps_fn(params, label_N, guidance):
        """eps(x, t) for sampling: conditional, unconditional, or guided in one batched call."""
        def to_eps(out, x, t_B):
            return out if cfg.prediction == "eps" else D.eps_from_v(schedule, x, t_B, out)

        def fn(x, t_B):
            if not K:
                return to_eps(apply(params, x, t_B, None, None), x, t_B)
            if guidance == 1.0:
                return to_eps(apply(params, x, t_B, label_N, None), x, t_B)
            both = apply(params, jnp.concatenate([x, x]), jnp.concatenate([t_B, t_B]),
                         jnp.concatenate([label_N, jnp.full_like(label_N, K)]), None)
            cond, uncond = jnp.split(to_eps(both, jnp.concatenate([x, x]), jnp.concatenate([t_B, t_B])), 2)
            return D.classifier_free_guidance(cond, uncond, guidance)
        return fn

    @functools.partial(xla.jit, static_argnames=("n", "sampler", "steps", "guidance"))
    def draw(params, key, label_N, *, n, sampler, steps, guidance):
        x = D.sample(key, eps_fn(params, label_N, guidance), schedule, (n, *cfg.image_shape), sampler=sampler,
                     num_steps=steps or None, clip_x0=1.0 if cfg.clip_x0 else None)
        return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)

    def labels_for(n, label):
        if not K:
            if label is not None:
                raise ConfigError("--label needs a class-conditional model (model.num_classes > 0)")
            return None
        if label is None:   # one class per grid row position: 0, 1, ..., K-1, 0, 1, ...
            return jnp.arange(n, dtype=jnp.int32) % K
        if not 0 <= int(label) < K:
            raise ConfigError(f"--label must be in [0, {K - 1}], got {label}")
        return jnp.full((n,), int(label), jnp.int32)

    def generate(params, key, request):
        n = int(request.get("n") or 64)
        sampler = request.get("sampler") or cfg.sampler
        sampler = {"dpm": "dpm_solver"}.get(sampler, sampler)
        if sampler not in D.SAMPLERS:
            raise ConfigError(unknown("sampler", sampler, D.SAMPLERS))
        steps = int(request.get("steps") or cfg.sample_steps or 0)
        if sampler == "ddpm" and steps not in (0, cfg.num_timesteps):
            raise ConfigError(f"the ddpm sampler always runs all {cfg.num_timesteps} steps; use --sampler "
                              f"ddim or dpm_solver for {steps}")
        D.timesteps(cfg.num_timesteps, steps or cfg.num_timesteps)   # range check, clear error
        guidance = float(cfg.guidance if request.get("guidance") is None else request["guidance"])
        if guidance != 1.0 and not K:
            raise ConfigError("--guidance needs a class-conditional model (model.num_classes > 0)")
        images = draw(params, key, labels_for(n, request.get("label")), n=n, sampler=sampler, steps=steps,
                      guidance=guidance)
        return {"images": {"samples": images}}

    def sample(params, key, n):
        return draw(params, key, labels_for(n, None), n=n, sampler=cfg.sampler, steps=cfg.sample_steps,
                    guidance=cfg.guidance if K else 1.0)

    return ModelDef(init=init, loss=loss, sample=sample, evaluate=evaluate, generate=generate,
                    sample_options=("n", "sampler", "steps", "guidance", "label"))


# ---- config plumbing shared by ddpm and dit ----

DIFFUSION_KEYS = tuple(f.name for f in dataclasses.fields(DiffusionConfig) if f.name != "image_shape")


def diffusion_defaults() -> dict[str, Any]:
    return {k: getattr(DiffusionConfig((1, 1, 1)), k) for k in DIFFUSION_KEYS}


def split_model_cfg(model_cfg, net_keys, info) -> tuple[DiffusionConfig, dict[str, Any]]:
    """The `model` block -> (DiffusionConfig, network kwargs); unknown keys name the valid ones."""
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    valid = sorted(set(DIFFUSION_KEYS) | set(net_keys))
    for k in d:
        if k not in valid:
            raise ConfigError(unknown("model key", k, valid))
    if info.get("kind") != "image" or len(info.get("shape", ())) != 3:
        raise ConfigError(f"diffusion models need image data [H, W, C]; {info.get('name')!r} is "
                          f"{info.get('kind')} with shape {info.get('shape')}")
    K = int(d.get("num_classes", 0))
    if K and int(info.get("num_classes") or 0) != K:
        raise ConfigError(f"model.num_classes={K} but data {info.get('name')!r} has "
                          f"{info.get('num_classes') or 'no'} classes")
    dcfg = DiffusionConfig(tuple(int(s) for s in info["shape"]), **{k: d[k] for k in DIFFUSION_KEYS if k in d})
    return dcfg, {k: d[k] for k in net_keys if k in d}


# ---- ddpm: the UNet denoiser ----

UNET_KEYS = ("block_out_channels", "layers_per_block", "attention_levels", "attention_head_dim",
             "norm_num_groups", "dropout", "dtype")


def make_ddpm(dcfg: DiffusionConfig, *, block_out_channels=(64, 128), layers_per_block=2,
              attention_levels=(False, True), attention_head_dim=8, norm_num_groups=32, dropout=0.0,
              dtype="float32") -> ModelDef:
    from zoo.nn.unet import UNet, UNetConfig

    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(unknown("dtype", dtype, ("float32", "bfloat16")))
    ucfg = UNetConfig(in_channels=dcfg.image_shape[2], block_out_channels=tuple(block_out_channels),
                      layers_per_block=int(layers_per_block), attention_levels=tuple(attention_levels),
                      attention_head_dim=int(attention_head_dim), norm_num_groups=int(norm_num_groups),
                      dropout=float(dropout), num_classes=dcfg.num_classes,
                      dtype=jnp.bfloat16 if dtype == "bfloat16" else None)
    net = UNet(ucfg)

    def init_net(key, x):
        label = jnp.zeros((1,), jnp.int32) if dcfg.num_classes else None
        return net.init(key, x, jnp.zeros((1,), jnp.int32), label)["params"]

    def apply(params, x, t_B, label, dropout_key):
        if dropout_key is None:
            return net.apply({"params": params}, x, t_B, label)
        return net.apply({"params": params}, x, t_B, label, deterministic=False, rngs={"dropout": dropout_key})

    return make_diffusion(dcfg, init_net, apply, per_example_dropout=float(dropout) > 0)


def ddpm_config() -> ml_collections.ConfigDict:
    # Sized for the 8x8 digits on a CPU: 0.7M parameters, ~0.3 s per step of 64 on 2 cores.
    # experiments/ddpm_cifar10.py is the paper's 35.7M-parameter CIFAR-10 model.
    c = base_config()
    c.data.name = "digits"
    c.batch_size = 64
    c.steps = 4000
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 200
    c.optimizer.grad_clip = 1.0
    c.ema_decay = 0.999          # `zoo sample` and `zoo eval` use the EMA weights
    c.log_every = 50
    c.ckpt_every = 1000
    c.model = ml_collections.ConfigDict(dict(diffusion_defaults(), **{
        "block_out_channels": (32, 64),       # UNet widths per resolution level (8x8, 4x4 on digits)
        "layers_per_block": 1,                # ResBlocks per level (the up path has one more)
        "attention_levels": (False, True),    # self-attention at the 4x4 level, as DDPM at 16x16
        "attention_head_dim": 8,              # channels per attention head (diffusers' default)
        "norm_num_groups": 8,                 # GroupNorm groups (32 in the paper's wider model)
        "dropout": 0.0,                       # ResBlock dropout (DDPM CIFAR-10 uses 0.1)
        "dtype": "float32",                   # compute dtype: float32 | bfloat16 (params stay f32)
    }))
    return c


@register("ddpm", "DDPM: UNet denoiser, DDPM/DDIM/DPM-Solver sampling, classifier-free guidance (Ho et al. 2020)",
          ddpm_config)
def build_ddpm(model_cfg, info) -> ModelDef:
    dcfg, net_kwargs = split_model_cfg(model_cfg, UNET_KEYS, info)
    return make_ddpm(dcfg, **net_kwargs)
