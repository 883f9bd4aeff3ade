"""Bernoulli RBM trained by CD-k or PCD, scored by AIS: the zoo's `rbm`.

Hinton 2002 (CD-k), Tieleman 2008 (PCD), Salakhutdinov & Murray 2008 (AIS). The math is in
zoo.ops.gibbs; this file wires it into the ModelDef contract. CD-k is the gradient of
F(v_data) - F(stop_gradient(v_k)); with `persistent=True` the negative chains live in
TrainState.extra and carry over between steps (a stateful loss).

Shape letters: B batch, V visible units (prod data_shape), H hidden units, N samples.
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
from zoo.registry import register
from zoo.train.config import base_config


@dataclasses.dataclass(frozen=True)
class RBMConfig:
    data_shape: tuple[int, ...]
    num_hidden: int = 100        # H
    cd_k: int = 1                # Gibbs sweeps per negative sample
    persistent: bool = False     # PCD: keep the negative chains across steps
    init_scale: float = 0.01     # std of the initial weights
    sample_steps: int = 1000     # Gibbs sweeps for `sample`
    ais_chains: int = 256        # AIS chains for the held-out log-likelihood
    ais_betas: int = 20000       # AIS temperatures

    def __post_init__(self):
        for name in ("num_hidden", "cd_k", "sample_steps", "ais_chains"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.ais_betas < 2:
            raise ConfigError(f"model.ais_betas must be >= 2, got {self.ais_betas}")
        if self.init_scale <= 0:
            raise ConfigError(f"model.init_scale must be > 0, got {self.init_scale}")


def _flat(cfg: RBMConfig, x):
    if tuple(x.shape[1:]) != tuple(cfg.data_shape):
        raise DataError(f"batch['x'] has per-example shape {tuple(x.shape[1:])}; the RBM expects {cfg.data_shape}")
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


def make_rbm(*, data_shape, num_hidden=100, cd_k=1, persistent=False, init_scale=0.01,
             sample_steps=1000, ais_chains=256, ais_betas=20000) -> ModelDef:
    cfg = RBMConfig(tuple(int(d) for d in data_shape), int(num_hidden), int(cd_k), bool(persistent),
                    float(init_scale), int(sample_steps), int(ais_chains), int(ais_betas))
    V = math.prod(cfg.data_shape)

    def init(key, batch):
        v = _flat(cfg, batch["x"])
        m = jnp.clip(jnp.mean(v, 0), 1e-2, 1 - 1e-2)  # visible biases at the data's log-odds (Hinton's guide)
        return {"W": cfg.init_scale * jax.random.normal(key, (V, cfg.num_hidden)),
                "b": jnp.log(m) - jnp.log1p(-m), "c": jnp.zeros((cfg.num_hidden,))}

    def metrics(params, v, loss):
        recon = gibbs.visible_probs(params, gibbs.hidden_probs(params, v))
        return {"loss": loss, "recon_error": jnp.mean(jnp.sum((v - recon) ** 2, -1))}

    def cd(params, key, batch):
        v = _flat(cfg, batch["x"])
        loss, _ = gibbs.cd_loss(params, key, v, cfg.cd_k)
        return loss, metrics(params, v, loss)

    def pcd(params, key, batch, extra):
        v = _flat(cfg, batch["x"])
        loss, v_k = gibbs.cd_loss(params, key, v, cfg.cd_k, v_chain=extra["chains"])
        return loss, (metrics(params, v, loss), {"chains": v_k})

    def init_extra(key, batch):  # PCD chains start at the first batch
        return {"chains": _flat(cfg, batch["x"])}

    def sample(params, key, n):
        k0, k1, k2 = jax.random.split(key, 3)
        v0 = (jax.random.uniform(k0, (n, V)) < 0.5).astype(jnp.float32)
        v = gibbs.run_chain(k1, params, v0, cfg.sample_steps)
        h = gibbs.sample_h(k2, params, v)
        return gibbs.visible_probs(params, h).reshape(n, *cfg.data_shape)

    def evaluate(params, key, batch):
        """Per-example log p(v) with log Z from AIS (base rates: this batch's pixel marginals)."""
        v = _flat(cfg, batch["x"])
        log_z, std_err = gibbs.ais_log_partition(key, params, cfg.ais_chains, cfg.ais_betas,
                                                 data_mean=jnp.mean(v, 0))
        ll = gibbs.log_likelihood(params, v, log_z)
        ones = jnp.ones_like(ll)
        return {"log_likelihood": ll, "log_Z": log_z * ones, "log_Z_std_err": std_err * ones}

    if cfg.persistent:
        return ModelDef(init=init, loss=pcd, sample=sample, evaluate=evaluate, init_extra=init_extra)
    return ModelDef(init=init, loss=cd, sample=sample, evaluate=evaluate)


def rbm_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.data.name = "digits_binary"
    c.batch_size = 64
    c.steps = 2250               # ~100 epochs of the 1437 training digits
    c.optimizer.name = "sgd"     # the classic RBM recipe: SGD with momentum
    c.optimizer.lr = 0.05
    c.optimizer.momentum = 0.9
    c.log_every = 50
    c.ckpt_every = 1000
    c.eval.batch_size = 512      # the 360 test digits in one batch: one AIS run
    c.model = ml_collections.ConfigDict({
        "num_hidden": 100, "cd_k": 1, "persistent": False, "init_scale": 0.01,
        "sample_steps": 1000, "ais_chains": 256, "ais_betas": 20000})
    return c


def make_grbm(*, data_shape, num_hidden=100, cd_k=1, learn_sigma=False, init_scale=0.01,
               sample_steps=1000) -> ModelDef:
    """Gaussian-Bernoulli RBM for real-valued images (Krizhevsky 2009; Cho et al. 2011).

    Pixels are centred with the first batch's per-pixel mean and scaled by its overall std (kept in
    params["norm"] behind stop_gradient, so they never train); sigma is 1 in those units or learned
    per pixel.
    """
    cfg = RBMConfig(tuple(int(d) for d in data_shape), int(num_hidden), int(cd_k), False,
                    float(init_scale), int(sample_steps))
    V = math.prod(cfg.data_shape)

    def init(key, batch):
        x = _flat(cfg, batch["x"])
        rbm = {"W": cfg.init_scale * jax.random.normal(key, (V, cfg.num_hidden)),
               "b": jnp.zeros((V,)), "c": jnp.zeros((cfg.num_hidden,))}
        if learn_sigma:
            rbm["log_sigma"] = jnp.zeros((V,))
        # one std for all pixels: per-pixel stds of near-constant border pixels blow up noise
        mean = jnp.mean(x, 0)
        return {"rbm": rbm, "norm": {"mean": mean, "std": jnp.sqrt(jnp.mean((x - mean) ** 2)) + 1e-3}}

    def rbm_params(params):
        """The RBM's params, sigma kept in [e^-1, e^1]: a sigma collapsing to 0 makes v / sigma^2
        explode (learned-variance GRBMs are known to be unstable; Cho et al. 2011)."""
        rbm = params["rbm"]
        if "log_sigma" not in rbm:
            return rbm
        return dict(rbm, log_sigma=jnp.clip(rbm["log_sigma"], -1.0, 1.0))

    def to_v(params, x):
        norm = jax.lax.stop_gradient(params["norm"])
        return (_flat(cfg, x) - norm["mean"]) / norm["std"]

    def to_x(params, v):
        return v * params["norm"]["std"] + params["norm"]["mean"]

    def loss(params, key, batch):
        v = to_v(params, batch["x"])
        total, _ = gibbs.grbm_cd_loss(rbm_params(params), key, v, cfg.cd_k)
        return total, {"loss": total, "recon_error": jnp.mean(recon_error(params, batch["x"]))}

    def recon_error(params, x):
        """Squared error per image, in pixel units, of the mean-field reconstruction."""
        v = to_v(params, x)
        h = gibbs.grbm_hidden_probs(rbm_params(params), v)
        x_rec = to_x(params, gibbs.grbm_visible_mean(rbm_params(params), h))
        return jnp.sum((x_rec - _flat(cfg, x)) ** 2, -1)

    def sample(params, key, n):
        k0, k1, k2 = jax.random.split(key, 3)
        v = gibbs.grbm_run_chain(k1, rbm_params(params), jax.random.normal(k0, (n, V)), cfg.sample_steps)
        h = (jax.random.uniform(k2, (n, cfg.num_hidden)) < gibbs.grbm_hidden_probs(rbm_params(params), v))
        mean = gibbs.grbm_visible_mean(rbm_params(params), h.astype(jnp.float32))
        return jnp.clip(to_x(params, mean), 0.0, 1.0).reshape(n, *cfg.data_shape)

    def evaluate(params, key, batch):
        v = to_v(params, batch["x"])
        return {"recon_error": recon_error(params, batch["x"]),
                "free_energy": gibbs.grbm_free_energy(rbm_params(params), v)}

    return ModelDef(init=init, loss=loss, sample=sample, evaluate=evaluate)


def grbm_config() -> ml_collections.ConfigDict:
    c = rbm_config()
    c.data.name = "digits"
    c.optimizer.lr = 0.005      # Gaussian visibles want a far smaller step than binary ones
    c.model = ml_collections.ConfigDict({
        "num_hidden": 100, "cd_k": 1, "learn_sigma": False, "init_scale": 0.01, "sample_steps": 1000})
    return c


def _kwargs(model_cfg, extra_keys=()) -> dict:
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    valid = ({f.name for f in dataclasses.fields(RBMConfig)} - {"data_shape"}) | set(extra_keys)
    bad = sorted(set(d) - valid)
    if bad:
        raise ConfigError(f"unknown model key {bad[0]!r}; valid: {', '.join(sorted(valid))}")
    return d


@register("rbm", "Bernoulli RBM, CD-k or PCD, AIS log-likelihood (Hinton 2002; Tieleman 2008)", rbm_config)
def build_rbm(model_cfg, info) -> ModelDef:
    return make_rbm(data_shape=tuple(info["shape"]), **_kwargs(model_cfg))


@register("grbm", "Gaussian-Bernoulli RBM for real-valued pixels, CD-k (Krizhevsky 2009; Cho et al. 2011)",
          grbm_config)
def build_grbm(model_cfg, info) -> ModelDef:
    kw = _kwargs(model_cfg, ("learn_sigma",))
    for k in ("persistent", "ais_chains", "ais_betas"):
        if k in kw:
            raise ConfigError(f"model.{k} does not apply to grbm")
    return make_grbm(data_shape=tuple(info["shape"]), **kw)
