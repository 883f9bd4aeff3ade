"""How a step runs on the devices: jit over a mesh (data parallel, optional FSDP) or jax.pmap.

Both take the same model, state and global batch and give the same numbers: the loss is a mean
over the global batch either way (pmap: local means, then pmean over equal shards), every
device folds the same step into the same key, and models draw per-example noise from the
example's global position (`zoo.ops.random`), not from the device they landed on.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
import optax

from zoo import xla
from zoo.models.base import ModelDef
from zoo.xla import init_compiler_options
from zoo.train import sharding
from zoo.train.state import TrainState, ema_update, init_state


def make_train_step(model_def: ModelDef, tx: optax.GradientTransformation, ema_decay: float,
                    axis_name: str | None = None) -> Callable:
    """step(state, key, batch) -> (state, metrics); key is folded with state.step inside.

    With axis_name (pmap) gradients and metrics are averaged over that axis.
    """

    def reduce(tree):
        return tree if axis_name is None else jax.lax.pmean(tree, axis_name)

    def step(state: TrainState, base_key, batch):
        key = jax.random.fold_in(base_key, state.step)
        if model_def.step is not None:
            state, metrics = model_def.step(state, key, batch)
            return state.replace(step=state.step + 1), reduce(metrics)
        extra = state.extra
        if model_def.init_extra is None:
            (loss, metrics), grads = jax.value_and_grad(model_def.loss, has_aux=True)(
                state.params, key, batch)
        else:  # stateful loss: (scalar, (metrics, new_extra))
            (loss, (metrics, extra)), grads = jax.value_and_grad(model_def.loss, has_aux=True)(
                state.params, key, batch, state.extra)
        grads = reduce(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = ema_update(ema, params, ema_decay)
        metrics = reduce({**metrics, "loss": loss})
        metrics["grad_norm"] = optax.global_norm(grads)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                             ema_params=ema, extra=extra), metrics

    return step


def init_fn(model_def, tx, ema_decay):
    def init(key, batch):
        extra = None
        if model_def.init_extra is not None:
            extra = model_def.init_extra(jax.random.fold_in(key, 1), batch)
        return init_state(model_def.init(key, batch), tx, ema_decay, extra)

    return init


class JitStrategy:
    """jax.jit with NamedShardings: batch on "data"; params replicated or FSDP-sharded."""

    def __init__(self, model_def, tx, ema_decay, *, fsdp: bool = False, min_size: int = 2**16,
                 devices=None):
        self.mesh = sharding.make_mesh(devices)
        self.init_fn = init_fn(model_def, tx, ema_decay)
        self.fsdp, self.min_size = fsdp, min_size
        self.raw_step = make_train_step(model_def, tx, ema_decay)
        self._step = None

    def put_batch(self, local: dict) -> dict:
        return sharding.global_batch(local, self.mesh)

    def abstract_state(self, key, batch):
        abstract = jax.eval_shape(self.init_fn, key, batch)
        self.shardings = sharding.state_shardings(abstract, self.mesh, fsdp=self.fsdp,
                                                  min_size=self.min_size)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, self.shardings)

    def init(self, key, batch):
        self.abstract_state(key, batch)
        return jax.jit(self.init_fn, out_shardings=self.shardings,
                       compiler_options=init_compiler_options())(key, batch)

    def place(self, state):
        return state  # restored straight into self.shardings

    def step(self, state, key, batch):
        if self._step is None:
            rep = sharding.replicated(self.mesh)
            self._step = xla.jit(self.raw_step, donate_argnums=(0,),
                                 in_shardings=(self.shardings, rep, sharding.batch_sharding(self.mesh)),
                                 out_shardings=(self.shardings, rep))
        return self._step(state, key, batch)

    def canonical(self, state):
        return state


class PmapStrategy:
    """jax.pmap over this process's devices; state replicated, batch split on a leading axis."""

    def __init__(self, model_def, tx, ema_decay, **_):
        self.devices = jax.local_devices()
        self.init_fn = init_fn(model_def, tx, ema_decay)
        self._step = jax.pmap(make_train_step(model_def, tx, ema_decay, axis_name=sharding.DATA),
                              axis_name=sharding.DATA, in_axes=(0, None, 0), donate_argnums=(0,))

    def put_batch(self, local: dict) -> dict:
        n = len(self.devices)
        return {k: np.asarray(v).reshape((n, -1) + np.shape(v)[1:]) for k, v in local.items()}

    def _flat(self, batch):
        return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}

    def abstract_state(self, key, batch):
        dev = jax.sharding.SingleDeviceSharding(self.devices[0])
        abstract = jax.eval_shape(self.init_fn, key, self._flat(batch))
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract)

    def init(self, key, batch):
        return self.place(jax.jit(self.init_fn, compiler_options=init_compiler_options())(key, self._flat(batch)))

    def place(self, state):
        # a leading device axis; pmap moves each slice to its device on the first step
        n = len(self.devices)
        return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + x.shape), jax.device_get(state))

    def step(self, state, key, batch):
        state, metrics = self._step(state, key, batch)
        return state, jax.tree.map(lambda m: m[0], metrics)

    def canonical(self, state):
        return jax.tree.map(lambda x: x[0], state)


def make_strategy(parallel: str, model_def, tx, ema_decay, *, min_size: int, devices=None):
    from zoo.errors import ConfigError, unknown

    if parallel == "jit":
        return JitStrategy(model_def, tx, ema_decay, devices=devices)
    if parallel == "fsdp":
        return JitStrategy(model_def, tx, ema_decay, fsdp=True, min_size=min_size, devices=devices)
    if parallel == "pmap":
        if model_def.step is not None or model_def.init_extra is not None:
            # per-device copies of model-owned state (PCD chains, ...) would drift apart under pmap
            raise ConfigError("parallel='pmap' runs stateless gradient steps only; this model has a "
                              "custom step or model-owned state: use jit or fsdp")
        return PmapStrategy(model_def, tx, ema_decay)
    raise ConfigError(unknown("parallel", parallel, ("jit", "fsdp", "pmap")))


def host_metrics(metrics) -> dict[str, float]:
    """The one device->host transfer per step: scalars the loop logs and checks."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}

