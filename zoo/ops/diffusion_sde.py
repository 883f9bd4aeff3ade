"""Continuous-time diffusion: the variance-preserving SDE, its probability-flow ODE, and the ODE's
exact log-likelihood (Song et al. 2021, "Score-Based Generative Modeling through SDEs").

VP SDE (eq. 11 with a linear beta(t), t in [0, 1]): dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw,
  beta(t) = beta_min + t (beta_max - beta_min),
  x_t | x_0 ~ N(m(t) x_0, s(t)^2 I),  m(t) = exp(-1/4 t^2 (beta_max - beta_min) - 1/2 t beta_min),
  s(t)^2 = 1 - m(t)^2.
A denoiser eps_fn(x, t_B) (t_B float [B]) predicts the noise, so score(x, t) = -eps / s(t).
Probability-flow ODE (eq. 13): dx/dt = f(x, t) = -1/2 beta(t) (x + score) = -1/2 beta(t) (x - eps / s(t)).
Log-likelihood (App. D.2, the instantaneous change of variables of Chen et al. 2018):
  log p_0(x(t0)) = log p_1(x(1)) + int_{t0}^{1} div f(x(t), t) dt,  p_1 = N(0, I),
integrated here with fixed-step RK4 on a grid that is denser near t0 (t = t0 + (1 - t0) u^2, u
uniform), where the drift changes fastest. The divergence is exact (the trace of the Jacobian, one
forward-mode pass per dimension: for low dimension) or Hutchinson's estimate z^T J z with one
Rademacher probe held fixed along the path (Grathwohl et al. 2019, "FFJORD"): unbiased, for images.

Shape letters: B batch; x is [B, ...] with d = prod(...) dimensions per example.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from zoo.errors import ConfigError, unknown


class VPSDE(NamedTuple):
    beta_min: float = 0.1
    beta_max: float = 20.0

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def marginal(self, t):
        """(m(t), s(t)) of x_t | x_0 ~ N(m x_0, s^2 I)."""
        log_m = -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return jnp.exp(log_m), jnp.sqrt(-jnp.expm1(2.0 * log_m))


def _bcast(a_B, x):
    return jnp.reshape(a_B, a_B.shape + (1,) * (x.ndim - a_B.ndim))


def vp_perturb(sde: VPSDE, x0, t_B, noise):
    """x_t = m(t) x_0 + s(t) noise."""
    m, s = sde.marginal(t_B)
    return _bcast(m, x0) * x0 + _bcast(s, x0) * noise


def pf_ode_drift(eps_fn, sde: VPSDE, x, t_B):
    """f(x, t) = -1/2 beta(t) (x - eps(x, t) / s(t))."""
    _, s = sde.marginal(t_B)
    return -0.5 * _bcast(sde.beta(t_B), x) * (x - eps_fn(x, t_B) / _bcast(s, x))


def _grid(t0: float, num_steps: int) -> jax.Array:
    u = jnp.linspace(0.0, 1.0, num_steps + 1)
    return t0 + (1.0 - t0) * u**2


def _rk4(fn, state, ts):
    """Integrate d state/dt = fn(state, t) over the grid ts (either direction)."""

    def body(y, tt):
        t, t_next = tt
        h = t_next - t
        k1 = fn(y, t)
        k2 = fn(jax.tree.map(lambda a, b: a + 0.5 * h * b, y, k1), t + 0.5 * h)
        k3 = fn(jax.tree.map(lambda a, b: a + 0.5 * h * b, y, k2), t + 0.5 * h)
        k4 = fn(jax.tree.map(lambda a, b: a + h * b, y, k3), t_next)
        return jax.tree.map(lambda a, b1, b2, b3, b4: a + h / 6 * (b1 + 2 * b2 + 2 * b3 + b4),
                            y, k1, k2, k3, k4), None

    y, _ = jax.lax.scan(body, state, (ts[:-1], ts[1:]))
    return y


def _check(num_steps, t0):
    if int(num_steps) < 1:
        raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < t0 < 1.0:
        raise ConfigError(f"t0 must be in (0, 1), got {t0}")


TRACES = ("exact", "hutchinson")


def divergence(f_one, x_B, t_B, *, trace: str = "exact", probe_B=None):
    """Per-example div_x f(x, t) of `f_one(x_single, t_scalar)`: exact Jacobian trace or z^T J z."""
    if trace == "exact":
        def tr(x, t):
            d = x.size
            J = jax.jacfwd(lambda y: f_one(y.reshape(x.shape), t).reshape(-1))(x.reshape(-1))
            return jnp.trace(J.reshape(d, d))
        return jax.vmap(tr)(x_B, t_B)
    if trace == "hutchinson":
        def est(x, t, z):
            _, Jz = jax.jvp(lambda y: f_one(y, t), (x,), (z,))
            return jnp.sum(z * Jz)
        return jax.vmap(est)(x_B, t_B, probe_B)
    raise ConfigError(unknown("trace estimator", trace, TRACES))


def probability_flow_nll(eps_fn, sde: VPSDE, x0, *, num_steps: int = 200, t0: float = 1e-5,
                         trace: str = "exact", key=None) -> jax.Array:
    """-log p(x0) in nats per example [B] under the model's probability-flow ODE (RK4, `num_steps`)."""
    _check(num_steps, t0)
    if trace not in TRACES:
        raise ConfigError(unknown("trace estimator", trace, TRACES))
    B = x0.shape[0]
    d = math.prod(x0.shape[1:])
    probe = None
    if trace == "hutchinson":
        if key is None:
            raise ConfigError("trace='hutchinson' needs a PRNG key for its probe")
        probe = jax.random.rademacher(key, x0.shape, x0.dtype)

    def f_one(x, t):
        return pf_ode_drift(eps_fn, sde, x[None], jnp.reshape(t, (1,)))[0]

    def fn(state, t):
        x, _ = state
        t_B = jnp.full((B,), t, x.dtype)
        return pf_ode_drift(eps_fn, sde, x, t_B), divergence(f_one, x, t_B, trace=trace, probe_B=probe)

    x1, int_div = _rk4(fn, (x0, jnp.zeros((B,), x0.dtype)), _grid(t0, num_steps))
    log_p1 = -0.5 * jnp.sum(jnp.reshape(x1, (B, -1)) ** 2, axis=1) - 0.5 * d * math.log(2 * math.pi)
    return -(log_p1 + int_div)


def probability_flow_sample(key, eps_fn, sde: VPSDE, shape, *, num_steps: int = 200,
                            t0: float = 1e-5) -> jax.Array:
    """x(t0) from x(1) ~ N(0, I) by integrating the probability-flow ODE backwards (RK4)."""
    _check(num_steps, t0)
    x1 = jax.random.normal(key, tuple(shape))
    fn = lambda x, t: pf_ode_drift(eps_fn, sde, x, jnp.full(x.shape[:1], t, x.dtype))
    return _rk4(fn, x1, _grid(t0, num_steps)[::-1])
