"""TrainState and the optimizer built from config.

The state is one pytree: what a checkpoint holds and what the jitted step donates and returns.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from zoo.errors import ConfigError, unknown


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: optimizer steps done
    params: Any
    opt_state: Any
    ema_params: Any          # None when config.ema_decay == 0
    extra: Any               # model-owned state (PCD chains, ...); None when unused


OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")


# optimizer.KEY: [low, high); lr must also be > 0. NaN fails every check.
_RANGES = {"lr": (0.0, float("inf")), "warmup_steps": (0, float("inf")), "b1": (0.0, 1.0), "b2": (0.0, 1.0),
           "weight_decay": (0.0, float("inf")), "momentum": (0.0, 1.0), "grad_clip": (0.0, float("inf"))}


def _check_values(opt: ml_collections.ConfigDict) -> None:
    """Each optimizer number in its range: lr > 0; betas and momentum in [0, 1); the rest >= 0."""
    for key, (low, high) in _RANGES.items():
        if key not in opt:
            continue
        value = float(opt[key])
        if not (low <= value < high) or (key == "lr" and not value > 0):
            want = "> 0" if key == "lr" else (f"in [0, {high:g})" if high < float("inf") else ">= 0")
            raise ConfigError(f"optimizer.{key} must be {want}, got {opt[key]}")


def make_lr_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    if opt.schedule not in SCHEDULES:
        raise ConfigError(unknown("optimizer.schedule", opt.schedule, SCHEDULES))
    _check_values(opt)
    warmup = int(opt.warmup_steps)
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, opt.lr, max(warmup, 1), max(total_steps, warmup + 1))
    if warmup:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, opt.lr, warmup), optax.constant_schedule(opt.lr)], [warmup])
    return optax.constant_schedule(opt.lr)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int,
                   trainable=None) -> optax.GradientTransformation:
    """optax transform from the `optimizer` config block; bad names name the valid ones.

    trainable(params) -> pytree of bools (ModelDef.trainable): the optimizer updates only the True
    leaves; the others get zero updates and keep no optimizer state (LoRA, soft prompts).
    """
    if opt.name not in OPTIMIZERS:
        raise ConfigError(unknown("optimizer.name", opt.name, OPTIMIZERS))
    lr = make_lr_schedule(opt, total_steps)
    if opt.name == "adam":
        tx = optax.adam(lr, b1=opt.b1, b2=opt.b2)
    elif opt.name == "adamw":
        tx = optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
    else:
        tx = optax.sgd(lr, momentum=opt.momentum or None)
    if opt.grad_clip and opt.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx)
    if trainable is not None:
        labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable(params))
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx


def init_state(params, tx: optax.GradientTransformation, ema_decay: float, extra=None) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if ema_decay > 0 else None,
        extra=extra,
    )


def ema_update(ema, params, decay: float):
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
