"""zoo.ops.diffusion / diffusion_sde against closed forms in NumPy and exactly solvable Gaussian data."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.errors import ConfigError, DataError
from zoo.ops import diffusion as D
from zoo.ops import diffusion_sde as S

MU, STD = 1.5, 0.5   # Gaussian "data": x_0 ~ N(MU, STD^2 I), whose exact eps is known in closed form


def gaussian_eps(schedule):
    """eps*(x_t, t) = E[eps | x_t] for x_0 ~ N(MU, STD^2): sqrt(1-a) (x - sqrt(a) MU) / (a STD^2 + 1 - a)."""
    def eps_fn(x, t_B):
        a = schedule.alphas_cumprod[t_B].reshape(-1, *(1,) * (x.ndim - 1))
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * STD**2 + 1 - a)
    return eps_fn


def test_schedules_match_closed_forms():
    lin = D.linear_schedule(1000, 1e-4, 0.02)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(lin.betas, betas, rtol=1e-6)
    np.testing.assert_allclose(lin.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)
    assert lin.betas.dtype == jnp.float32 and lin.num_timesteps == 1000

    T, s = 50, 0.008
    cos = D.cosine_schedule(T, s=s)
    abar = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
            for t in range(1, T + 1)]
    # abar itself is the product of the (clipped) betas: equal to f(t)/f(0) until the clip at the end
    np.testing.assert_allclose(cos.alphas_cumprod[:-1], abar[:-1], rtol=1e-5)
    assert float(cos.betas[-1]) == pytest.approx(0.999)   # the last beta is clipped
    assert D.make_schedule("cosine", 10).num_timesteps == 10
    with pytest.raises(ConfigError, match="valid: cosine, linear"):
        D.make_schedule("quadratic")
    with pytest.raises(ConfigError):
        D.linear_schedule(100, 0.1, 0.01)


def test_q_sample_and_posterior_against_bayes_rule():
    sch = D.linear_schedule(100)
    rng = np.random.default_rng(0)
    x0, noise, xt = (rng.standard_normal((4, 3, 2)).astype(np.float32) for _ in range(3))
    t = np.array([0, 1, 50, 99])
    b = np.linspace(1e-4, 0.02, 100)
    a = np.cumprod(1 - b)
    want = np.sqrt(a[t])[:, None, None] * x0 + np.sqrt(1 - a[t])[:, None, None] * noise
    np.testing.assert_allclose(D.q_sample(sch, x0, t, noise), want, rtol=1e-5, atol=1e-6)

    # independent: q(x_{t-1}|x_0) N(sqrt(a') x0, 1-a') times q(x_t|x_{t-1}) N(sqrt(1-b) x_{t-1}, b)
    mean, var = D.posterior_mean_variance(sch, x0, xt, t)
    a_prev = np.where(t > 0, a[np.maximum(t - 1, 0)], 1.0)
    prec = 1 / np.maximum(1 - a_prev, 1e-300) + (1 - b[t]) / b[t]
    var_want = np.where(t > 0, 1 / prec, 0.0)
    mean_t0 = x0  # at t = 0 the posterior is a point mass at x_0
    mean_want = (var_want[:, None, None] * (np.sqrt(a_prev)[:, None, None] * x0 / np.maximum(1 - a_prev, 1e-300)[:, None, None]
                                            + np.sqrt(1 - b[t])[:, None, None] * xt / b[t][:, None, None]))
    mean_want[0] = mean_t0[0]
    np.testing.assert_allclose(var[:, 0, 0], var_want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(mean, mean_want, rtol=1e-4, atol=1e-5)


def test_prediction_conversions_round_trip():
    sch = D.cosine_schedule(200)
    rng = np.random.default_rng(1)
    x0, eps = rng.standard_normal((2, 5, 4)).astype(np.float32)
    t = np.array([3, 150, 40, 199, 0])
    xt = D.q_sample(sch, x0, t, eps)
    a = np.asarray(sch.alphas_cumprod)[t][:, None]
    v = np.sqrt(a) * eps - np.sqrt(1 - a) * x0
    np.testing.assert_allclose(D.x0_from_eps(sch, xt, t, eps)[:4], x0[:4], atol=2e-3)  # t=199: abar tiny
    np.testing.assert_allclose(D.eps_from_x0(sch, xt, t, x0)[1:], eps[1:], atol=1e-3)  # t=0: 1-abar tiny
    np.testing.assert_allclose(D.v_from_eps(sch, xt, t, eps)[:4], v[:4], atol=1e-3)
    np.testing.assert_allclose(D.eps_from_v(sch, xt, t, v), eps, atol=1e-5)
    np.testing.assert_allclose(D.x0_from_v(sch, xt, t, v), x0, atol=1e-5)


def test_classifier_free_guidance_limits():
    rng = np.random.default_rng(2)
    c, u = rng.standard_normal((2, 3, 4))
    np.testing.assert_allclose(D.classifier_free_guidance(c, u, 1.0), c, atol=1e-12)
    np.testing.assert_allclose(D.classifier_free_guidance(c, u, 0.0), u, atol=1e-12)
    np.testing.assert_allclose(D.classifier_free_guidance(c, u, 3.0), u + 3 * (c - u), atol=1e-12)


@pytest.mark.parametrize("sampler,steps,tol", [("ddpm", None, 0.05), ("ddim", 50, 0.05), ("dpm_solver", 20, 0.05)])
def test_samplers_reproduce_gaussian_data(sampler, steps, tol):
    sch = D.linear_schedule(1000)
    fn = jax.jit(lambda k: D.sample(k, gaussian_eps(sch), sch, (4096, 2), sampler=sampler, num_steps=steps))
    x = np.asarray(fn(jax.random.key(0)))
    assert abs(x.mean() - MU) < tol, x.mean()
    assert abs(x.std() - STD) < tol * STD * 2, x.std()


def test_ddim_deterministic_and_inversion_round_trips():
    sch = D.linear_schedule(1000)
    eps_fn = gaussian_eps(sch)
    xT = jax.random.normal(jax.random.key(1), (256, 2))
    a = D.ddim_sample(jax.random.key(2), eps_fn, sch, xT.shape, 50, x_T=xT)
    b = D.ddim_sample(jax.random.key(3), eps_fn, sch, xT.shape, 50, x_T=xT)
    np.testing.assert_array_equal(a, b)  # eta = 0: the key does not matter
    c = D.ddim_sample(jax.random.key(3), eps_fn, sch, xT.shape, 50, eta=1.0, x_T=xT)
    assert np.abs(np.asarray(a - c)).max() > 0.1

    x0 = MU + STD * jax.random.normal(jax.random.key(4), (256, 2))
    errs = []
    for steps in (25, 100):   # first-order inversion: the round-trip error shrinks with the step size
        xT = D.ddim_invert(eps_fn, sch, x0, steps)
        back = D.ddim_sample(None, eps_fn, sch, x0.shape, steps, x_T=xT)
        errs.append(float(jnp.abs(back - x0).mean()))
    assert errs[1] < 0.02 and errs[1] < errs[0] / 2, errs
    assert abs(float(xT.std()) - 1.0) < 0.1   # data -> (almost) the N(0, I) prior


def test_bad_inputs_give_clear_errors():
    sch = D.linear_schedule(10)
    x = jnp.zeros((2, 3))
    with pytest.raises(DataError, match=r"in \[0, 9\]"):
        D.q_sample(sch, x, np.array([0, 10]), x)
    with pytest.raises(DataError, match="integers"):
        D.q_sample(sch, x, np.array([0.5, 1.0]), x)
    with pytest.raises(DataError, match="noise shape"):
        D.q_sample(sch, x, np.array([0, 1]), jnp.zeros((2, 4)))
    with pytest.raises(ConfigError, match="valid: ddim, ddpm, dpm_solver"):
        D.sample(None, gaussian_eps(sch), sch, (2, 3), sampler="euler")
    with pytest.raises(ConfigError, match=r"num_steps must be in \[1, 10\]"):
        D.ddim_sample(jax.random.key(0), gaussian_eps(sch), sch, (2, 3), 11)
    with pytest.raises(DataError, match="shape"):
        D.ddpm_sample(jax.random.key(0), gaussian_eps(sch), sch, (4,))


# ---- continuous time: probability-flow ODE ----

def vp_gaussian_eps(sde):
    """Exact eps of N(MU, STD^2) data under the VP SDE: s(t) (x - m MU) / (m^2 STD^2 + s^2)."""
    def eps_fn(x, t_B):
        m, s = sde.marginal(t_B)
        m, s = m.reshape(-1, *(1,) * (x.ndim - 1)), s.reshape(-1, *(1,) * (x.ndim - 1))
        return s * (x - m * MU) / (m**2 * STD**2 + s**2)
    return eps_fn


def test_pf_ode_nll_equals_gaussian_closed_form():
    # beta_max 40 instead of 20: at t = 1 the true marginal's mean is m(1) MU = 7e-5 (1e-2 with 20),
    # so the N(0, I) prior the likelihood assumes is exact to ~1e-4 nats and what is left is the ODE
    sde = S.VPSDE(0.1, 40.0)
    x0 = MU + STD * jax.random.normal(jax.random.key(0), (64, 2))
    nll = S.probability_flow_nll(vp_gaussian_eps(sde), sde, x0, num_steps=100, t0=1e-5)
    m, s = (float(v) for v in sde.marginal(1e-5))
    var = m**2 * STD**2 + s**2   # the ODE's density is the marginal at t0 (~ the data's)
    want = 0.5 * np.sum((np.asarray(x0) - m * MU) ** 2, 1) / var + np.log(2 * np.pi * var)
    np.testing.assert_allclose(nll, want, atol=1e-3)

    # Hutchinson: unbiased, so its mean over many probes approaches the exact value
    x_rep = jnp.broadcast_to(x0[:1], (2048, 2))
    est = S.probability_flow_nll(vp_gaussian_eps(sde), sde, x_rep, num_steps=50, trace="hutchinson",
                                 key=jax.random.key(1))
    assert abs(float(est.mean()) - want[0]) < 0.05
    with pytest.raises(ConfigError, match="valid: exact, hutchinson"):
        S.probability_flow_nll(vp_gaussian_eps(sde), sde, x0, trace="skilling")
    with pytest.raises(ConfigError, match="needs a PRNG key"):
        S.probability_flow_nll(vp_gaussian_eps(sde), sde, x0, trace="hutchinson")


def test_pf_ode_sample_reproduces_gaussian():
    sde = S.VPSDE()
    x = S.probability_flow_sample(jax.random.key(2), vp_gaussian_eps(sde), sde, (4096, 2), num_steps=100)
    assert abs(float(x.mean()) - MU) < 0.05 and abs(float(x.std()) - STD) < 0.05
