"""A run's workdir: config.json, metrics.jsonl, checkpoints/. Rebuilding a trained model from it."""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from zoo import registry
from zoo.data import Loader, load
from zoo.errors import ZooError
from zoo.models.base import ModelDef
from zoo.train.checkpoint import Checkpointer
from zoo.train.loop import keys
from zoo.train.state import make_optimizer
from zoo.train.strategy import init_fn


def build(config: ml_collections.ConfigDict, split: str = "train"):
    """-> (ModelDef, Source) for config.name on config.data's `split`."""
    entry = registry.get(config.name)
    data_cfg = config.data.to_dict()
    data_cfg.pop("shuffle", None)  # the loader's option, not the source's
    source = load(data_cfg.pop("name"), split, **data_cfg)
    return entry.build(config.model, source.info), source


def load_config(workdir: str, name: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ZooError(f"missing {path}: train first with `zoo train {name} --workdir {workdir}`")
    with open(path) as f:
        saved = json.load(f)
    if saved.get("name") != name:
        raise ZooError(f"{workdir} holds a {saved.get('name')!r} run, not {name!r}")
    config = registry.get(name).config()
    _merge(config, saved)
    return config


def _merge(config: ml_collections.ConfigDict, saved: dict) -> None:
    """Saved values over the defaults; JSON lists become tuples where the default is a tuple."""
    with config.unlocked():
        for k, v in saved.items():
            old = config.get(k)
            if isinstance(old, ml_collections.ConfigDict) and isinstance(v, dict):
                _merge(old, v)
            else:
                config[k] = tuple(v) if isinstance(old, tuple) and isinstance(v, list) else v


def restore_params(workdir: str, config, model_def: ModelDef, source, *, ema: bool = True):
    """Latest checkpoint's params (EMA params when the run kept them and `ema`) on one device."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpt = Checkpointer(ckpt_dir, keep=int(config.keep_checkpoints), async_save=False)
    if not ckpt.steps():
        raise ZooError(f"no checkpoint in {ckpt_dir}: train first with "
                       f"`zoo train {config.name} --workdir {workdir}`")
    tx = make_optimizer(config.optimizer, int(config.steps), model_def.trainable)
    batch = Loader(source, int(config.batch_size), 0).batch(0)  # extra (e.g. PCD chains) may be batch-sized
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.eval_shape(init_fn(model_def, tx, float(config.ema_decay)), keys(0)[0], batch)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract)
    state, _, step = ckpt.restore(abstract)
    ckpt.close()
    params = state.ema_params if (ema and state.ema_params is not None) else state.params
    return params, step


def trained_params(workdir: str, name: str, check=None):
    """(config, params on the host) of the trained `name` run in workdir, what a model's
    `model.init_from` points at; `check(config)` may raise before anything is restored."""
    config = load_config(workdir, name)
    if check is not None:
        check(config)
    model_def, source = build(config)
    params, _ = restore_params(workdir, config, model_def, source)
    return config, jax.device_get(params)

