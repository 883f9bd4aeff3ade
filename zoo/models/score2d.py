"""`score2d`: a small MLP noise-prediction (score) model on 2-D points, trained on the VP SDE, with
its exact log-likelihood through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D).

Training: t ~ U[t0, 1], x_t = m(t) x_0 + s(t) eps, loss = mean ||eps - net(x_t, t)||^2 (denoising
score matching with the "simple" weighting, score = -eps / s(t)). `evaluate` reports the model's
exact NLL (zoo.ops.diffusion_sde.probability_flow_nll, exact Jacobian trace: 2 dimensions) and the
true density's NLL of the same points (zoo.data.toy2d.log_density), both in nats per point, so
`zoo eval score2d` prints the model beside the floor any model of that data can reach.
`sample` integrates the ODE from N(0, I) at t = 1 back to t0.

Shape letters: B batch (points), F Fourier features of t, H hidden width.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from zoo.errors import ConfigError, DataError, unknown
from zoo.models.base import ModelDef
from zoo.ops import diffusion_sde as S
from zoo.ops.random import example_keys
from zoo.registry import register
from zoo.train.config import base_config


@dataclasses.dataclass(frozen=True)
class Score2DConfig:
    hidden: int = 256            # H
    num_layers: int = 3          # hidden layers of the MLP
    num_frequencies: int = 16    # F / 2: sin and cos of t at frequencies 2^0 .. 2^(F/2-1) (times pi)
    beta_min: float = 0.1        # VP SDE (Song et al. 2021, eq. 11)
    beta_max: float = 20.0
    t0: float = 1e-5             # smallest time trained and integrated to
    ode_steps: int = 100         # RK4 steps of the probability-flow ODE (likelihood and sampling)

    def __post_init__(self):
        for name in ("hidden", "num_layers", "num_frequencies", "ode_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.beta_min < self.beta_max:
            raise ConfigError(f"need 0 < beta_min < beta_max, got {self.beta_min}, {self.beta_max}")
        if not 0.0 < self.t0 < 0.1:
            raise ConfigError(f"t0 must be in (0, 0.1), got {self.t0}")


class ScoreMLP(nn.Module):
    """(x [B, 2], t [B] in [0, 1]) -> eps [B, 2]: an MLP on x and Fourier features of t."""

    cfg: Score2DConfig

    @nn.compact
    def __call__(self, x_Bx2, t_B):
        freqs_F = np.pi * 2.0 ** np.arange(self.cfg.num_frequencies)
        ang_BxF = t_B[:, None] * freqs_F
        h = jnp.concatenate([x_Bx2, t_B[:, None], jnp.sin(ang_BxF), jnp.cos(ang_BxF)], axis=-1)
        for _ in range(self.cfg.num_layers):
            h = nn.silu(nn.Dense(self.cfg.hidden)(h))
        return nn.Dense(x_Bx2.shape[-1], kernel_init=nn.initializers.zeros)(h)


def make_score2d(*, data_name: str | None = None, hidden=256, num_layers=3, num_frequencies=16, beta_min=0.1,
                 beta_max=20.0, t0=1e-5, ode_steps=100) -> ModelDef:
    """`data_name` (a toy2d set) lets `evaluate` add the true density's NLL of each point."""
    cfg = Score2DConfig(int(hidden), int(num_layers), int(num_frequencies), float(beta_min), float(beta_max),
                        float(t0), int(ode_steps))
    sde = S.VPSDE(cfg.beta_min, cfg.beta_max)
    net = ScoreMLP(cfg)

    def check(batch):
        x = batch["x"]
        if x.ndim != 2 or x.shape[1] != 2:
            raise DataError(f"score2d models 2-D points [B, 2]; got batch['x'] of shape {tuple(x.shape)}")
        return x.astype(jnp.float32)

    def init(key, batch):
        return net.init(key, check(batch)[:1], jnp.zeros((1,)))["params"]

    def eps_fn(params):
        return lambda x, t_B: net.apply({"params": params}, x, t_B)

    def loss(params, key, batch):
        x0 = check(batch)
        keys = jax.vmap(lambda k: jax.random.split(k))(example_keys(key, batch["idx"]))
        t_B = jax.vmap(lambda k: jax.random.uniform(k, (), minval=cfg.t0, maxval=1.0))(keys[:, 0])
        eps = jax.vmap(lambda k: jax.random.normal(k, (2,)))(keys[:, 1])
        pred = eps_fn(params)(S.vp_perturb(sde, x0, t_B, eps), t_B)
        mse = jnp.mean(jnp.sum(jnp.square(pred - eps), axis=-1))
        return mse, {"loss": mse}

    def evaluate(params, key, batch):
        del key  # the exact trace is deterministic
        x0 = check(batch)
        out = {"nll": S.probability_flow_nll(eps_fn(params), sde, x0, num_steps=cfg.ode_steps, t0=cfg.t0)}
        if data_name is not None:   # the floor: the data's own density, computed on the host
            out["true_nll"] = jax.pure_callback(_true_nll(data_name), jax.ShapeDtypeStruct(x0.shape[:1], jnp.float32),
                                                x0)
        return out

    def sample(params, key, n):
        return S.probability_flow_sample(key, eps_fn(params), sde, (n, 2), num_steps=cfg.ode_steps, t0=cfg.t0)

    return ModelDef(init=init, loss=loss, sample=sample, evaluate=evaluate)


def _true_nll(name):
    from zoo.data import toy2d

    return lambda x: (-toy2d.log_density(name, np.asarray(x))).astype(np.float32)


def score2d_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.data.name = "toy2d:moons"
    c.batch_size = 512
    c.steps = 10000
    c.optimizer.lr = 1e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 200
    c.ema_decay = 0.999
    c.log_every = 100
    c.ckpt_every = 5000
    c.eval.batch_size = 1000
    c.model = ml_collections.ConfigDict({
        "hidden": 256,            # MLP width
        "num_layers": 3,          # hidden layers
        "num_frequencies": 16,    # Fourier features of t (sin and cos each)
        "beta_min": 0.1,          # VP SDE noise rates (Song et al. 2021)
        "beta_max": 20.0,
        "t0": 1e-5,               # smallest diffusion time
        "ode_steps": 100,         # RK4 steps for the likelihood and for sampling
    })
    return c


@register("score2d", "score model on 2-D points: VP SDE, exact likelihood by the probability-flow ODE "
          "(Song et al. 2021)", score2d_config)
def build_score2d(model_cfg, info) -> ModelDef:
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    valid = sorted(set(make_score2d.__kwdefaults__) - {"data_name"})
    for k in d:
        if k not in valid:
            raise ConfigError(unknown("model key", k, valid))
    if info.get("kind") != "points" or tuple(info.get("shape", ())) != (2,):
        raise ConfigError(f"score2d needs 2-D points (e.g. data.name=toy2d:moons); {info.get('name')!r} is "
                          f"{info.get('kind')} with shape {info.get('shape')}")
    name = str(info.get("name", ""))
    return make_score2d(data_name=name.split(":", 1)[1] if name.startswith("toy2d:") else None, **d)
