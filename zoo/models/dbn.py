"""`dbn`: a deep belief net trained greedily, one RBM layer at a time, then a classifier head.

Hinton, Osindero & Teh 2006, "A fast learning algorithm for deep belief nets". Layer l's RBM
learns (CD-1) on the hidden probabilities of layers < l during steps [l P, (l+1) P) with
P = model.steps_per_layer; then a softmax head learns on the top layer's hidden probabilities (the
generative stack stays as pretrained, so `sample` is the DBN's own generative model). The phase
is read from state.step inside one jitted custom step: every phase's update is computed and all
but the active one are masked out, velocities included, so a finished layer never moves again.
The update is SGD with momentum (velocities in TrainState.extra); the loop's optimizer is unused.

Shape letters: B batch, V visible units, H_l hidden units of layer l, C classes, N samples.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections

from zoo.errors import ConfigError, DataError
from zoo.models.base import ModelDef
from zoo.ops import gibbs
from zoo.ops.losses import cross_entropy
from zoo.registry import register
from zoo.train.config import base_config


@dataclasses.dataclass(frozen=True)
class DBNConfig:
    data_shape: tuple[int, ...]
    num_classes: int
    hidden: tuple[int, ...] = (256, 256)   # units per RBM layer, bottom to top
    steps_per_layer: int = 2000           # P: CD-1 steps for each layer
    lr: float = 0.05                      # RBM learning rate
    head_lr: float = 0.1                  # classifier-head learning rate
    momentum: float = 0.9
    sample_steps: int = 1000              # Gibbs sweeps in the top RBM for `sample`

    def __post_init__(self):
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError(f"model.hidden must be one or more positive sizes, got {self.hidden}")
        if self.steps_per_layer < 1 or self.sample_steps < 1 or self.num_classes < 2:
            raise ConfigError("model.steps_per_layer and model.sample_steps must be >= 1 (and the data labelled)")
        if self.lr <= 0 or self.head_lr <= 0 or not 0 <= self.momentum < 1:
            raise ConfigError("model.lr and model.head_lr must be > 0 and model.momentum in [0, 1)")


def make_dbn(*, data_shape, num_classes, hidden=(256, 256), steps_per_layer=2000, lr=0.05, head_lr=0.1,
             momentum=0.9, sample_steps=1000) -> ModelDef:
    cfg = DBNConfig(tuple(int(d) for d in data_shape), int(num_classes), tuple(int(h) for h in hidden),
                    int(steps_per_layer), float(lr), float(head_lr), float(momentum), int(sample_steps))
    sizes = (math.prod(cfg.data_shape),) + cfg.hidden
    L = len(cfg.hidden)

    def flat(x):
        if tuple(x.shape[1:]) != cfg.data_shape:
            raise DataError(f"batch['x'] has per-example shape {tuple(x.shape[1:])}; the DBN expects {cfg.data_shape}")
        return x.reshape(x.shape[0], -1).astype(jnp.float32)

    def features(params, x, upto):
        """Hidden probabilities after the first `upto` layers: the input of layer `upto`."""
        h = flat(x)
        for rbm in params["rbms"][:upto]:
            h = gibbs.hidden_probs(rbm, h)
        return h

    def init(key, batch):
        keys = jax.random.split(key, L + 1)
        rbms = [{"W": 0.01 * jax.random.normal(k, (a, b)), "b": jnp.zeros((a,)), "c": jnp.zeros((b,))}
                for k, a, b in zip(keys, sizes[:-1], sizes[1:])]
        m = jnp.clip(jnp.mean(flat(batch["x"]), 0), 1e-2, 1 - 1e-2)
        rbms[0]["b"] = jnp.log(m) - jnp.log1p(-m)
        return {"rbms": rbms, "head": {"W": jnp.zeros((sizes[-1], cfg.num_classes)), "b": jnp.zeros((cfg.num_classes,))}}

    def head_loss(params, x, labels):
        logits = features(params, x, L) @ params["head"]["W"] + params["head"]["b"]
        return jnp.mean(cross_entropy(logits, labels)), logits

    def step(state, key, batch):
        params, phase = state.params, jnp.minimum(state.step // cfg.steps_per_layer, L)
        grads, losses = [], []
        for l in range(L):
            v = jax.lax.stop_gradient(features(params, batch["x"], l))
            loss, g = jax.value_and_grad(lambda r: gibbs.cd_loss(r, jax.random.fold_in(key, l), v, 1)[0])(params["rbms"][l])
            grads.append(g)
            losses.append(loss)
        (ce, _), g_head = jax.value_and_grad(
            lambda h: head_loss(dict(params, head=h), batch["x"], batch["label"]), has_aux=True)(params["head"])
        losses.append(ce)
        active = {"rbms": [phase == l for l in range(L)], "head": phase == L}
        lrs = {"rbms": [cfg.lr] * L, "head": cfg.head_lr}
        g_all = {"rbms": grads, "head": g_head}
        velocity = jax.tree.map(lambda vel, g, on: jnp.where(on, cfg.momentum * vel + g, 0.0),
                                state.extra, g_all, _expand(active, g_all))
        new = jax.tree.map(lambda p, vel, lr: p - lr * vel, params, velocity, _expand(lrs, g_all))
        metrics = {"loss": jnp.stack(losses)[phase], "phase": phase.astype(jnp.float32)}
        return state.replace(params=new, extra=velocity), metrics

    def init_extra(key, batch):  # momentum velocities, one per parameter
        return jax.tree.map(jnp.zeros_like, init(key, batch))

    def loss(params, key, batch):  # the head's cross-entropy: what `zoo eval`-style probes read
        ce, _ = head_loss(params, batch["x"], batch["label"])
        return ce, {"loss": ce}

    def sample(params, key, n):
        """Gibbs in the top RBM from noise, then one top-down pass of probabilities to the pixels."""
        k0, k1, k2 = jax.random.split(key, 3)
        top = params["rbms"][-1]
        v = (jax.random.uniform(k0, (n, sizes[-2])) < 0.5).astype(jnp.float32)
        v = gibbs.run_chain(k1, top, v, cfg.sample_steps)
        x = gibbs.visible_probs(top, gibbs.sample_h(k2, top, v))
        for rbm in reversed(params["rbms"][:-1]):
            x = gibbs.visible_probs(rbm, x)
        return x.reshape(n, *cfg.data_shape)

    def evaluate(params, key, batch):
        _, logits = head_loss(params, batch["x"], batch["label"])
        return {"accuracy": (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32),
                "nll_class": cross_entropy(logits, batch["label"])}

    return ModelDef(init=init, loss=loss, sample=sample, step=step, evaluate=evaluate, init_extra=init_extra)


def _expand(spec, like):
    """Broadcast a per-group value (one per RBM layer, one for the head) over each group's leaves."""
    return {"rbms": [jax.tree.map(lambda _: s, g) for s, g in zip(spec["rbms"], like["rbms"])],
            "head": jax.tree.map(lambda _: spec["head"], like["head"])}


def dbn_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.data.name = "digits_binary"
    c.batch_size = 64
    c.steps = 6000               # 2 layers x 2000 steps, then 2000 for the head
    c.log_every = 100
    c.ckpt_every = 2000
    c.eval.batch_size = 512
    c.model = ml_collections.ConfigDict({
        "hidden": (256, 256), "steps_per_layer": 2000, "lr": 0.05, "head_lr": 0.1, "momentum": 0.9,
        "sample_steps": 1000})
    return c


@register("dbn", "Deep belief net: greedy layer-wise RBMs + classifier head (Hinton et al. 2006)", dbn_config)
def build_dbn(model_cfg, info) -> ModelDef:
    kw = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    valid = {f.name for f in dataclasses.fields(DBNConfig)} - {"data_shape", "num_classes"}
    bad = sorted(set(kw) - valid)
    if bad:
        raise ConfigError(f"unknown model key {bad[0]!r}; valid: {', '.join(sorted(valid))}")
    if "num_classes" not in info:
        raise DataError(f"dbn needs labelled data; {info.get('name')} has no labels")
    return make_dbn(data_shape=tuple(info["shape"]), num_classes=info["num_classes"], **kw)
