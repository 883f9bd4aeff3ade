"""Restricted Boltzmann machines as pure functions: energies, conditionals, Gibbs chains, CD-k/PCD,
and the partition function (exact enumeration for tiny models, AIS otherwise).

Bernoulli RBM (Hinton 2002, "Training products of experts by minimizing contrastive divergence"):
  E(v, h) = -v.b - h.c - v W h,   F(v) = -v.b - sum_j softplus(c_j + (v W)_j).
PCD: Tieleman 2008. AIS: Salakhutdinov & Murray 2008, "On the quantitative analysis of deep
belief networks" (Sec. 3-4: base-rate model, tempered transitions, importance weights).
Gaussian-Bernoulli RBM (Krizhevsky 2009; Cho et al. 2011), with per-pixel sigma:
  E(v, h) = sum_i (v_i - b_i)^2 / (2 sigma_i^2) - h.c - (v / sigma^2) W h,
  p(v | h) = N(b + W h, sigma^2),   p(h | v) = sigmoid(c + (v / sigma^2) W).

Params: {"W": [V, H], "b": [V], "c": [H]} (+ "log_sigma": [V] for a learned-sigma GRBM).
Shape letters: B batch (chains), V visible, H hidden, K sweeps / temperatures.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MAX_ENUMERATED_UNITS = 24


def _check(params, v_BxV=None) -> None:
    W = params["W"]
    if W.ndim != 2 or params["b"].shape != (W.shape[0],) or params["c"].shape != (W.shape[1],):
        raise ValueError(f"RBM params need W [V, H], b [V], c [H]; got W {W.shape}, "
                         f"b {params['b'].shape}, c {params['c'].shape}")
    if v_BxV is not None and v_BxV.shape[-1] != W.shape[0]:
        raise ValueError(f"visible units: v has shape {v_BxV.shape} but W is {W.shape} (V={W.shape[0]})")


def _dot(x, w, compute_dtype=None):
    """x @ w, optionally in compute_dtype (e.g. bf16) with float32 accumulation."""
    if compute_dtype is None:
        return jnp.dot(x, w)
    return jnp.dot(x.astype(compute_dtype), w.astype(compute_dtype), preferred_element_type=jnp.float32)


def hidden_probs(params, v_BxV, *, compute_dtype=None):
    return jax.nn.sigmoid(params["c"] + _dot(v_BxV, params["W"], compute_dtype))


def visible_probs(params, h_BxH, *, compute_dtype=None):
    return jax.nn.sigmoid(params["b"] + _dot(h_BxH, params["W"].T, compute_dtype))


def _bernoulli(key, p, uniform_bits: int = 32):
    """Binary samples with P(1) = p. uniform_bits=16 compares p with 16-bit uniforms, two per
    32 random bits: half the PRNG work (20-30% faster chains on CPU) for a bias below 2^-16."""
    if uniform_bits == 32:
        return (jax.random.uniform(key, p.shape) < p).astype(jnp.float32)
    if uniform_bits != 16:
        raise ValueError(f"uniform_bits must be 32 or 16, got {uniform_bits}")
    last = p.shape[-1]
    bits = jax.random.bits(key, p.shape[:-1] + ((last + 1) // 2,), jnp.uint32)
    u16 = jnp.concatenate([bits & 0xFFFF, bits >> 16], axis=-1)[..., :last]
    return (u16.astype(jnp.float32) < p * 65536.0).astype(jnp.float32)


def energy(params, v_BxV, h_BxH):
    """E(v, h) per example: [B]."""
    _check(params, v_BxV)
    return -(v_BxV @ params["b"]) - (h_BxH @ params["c"]) - jnp.sum((v_BxV @ params["W"]) * h_BxH, -1)


def free_energy(params, v_BxV):
    """F(v) = -log sum_h exp(-E(v, h)) per example: [B]."""
    _check(params, v_BxV)
    return -(v_BxV @ params["b"]) - jnp.sum(jax.nn.softplus(params["c"] + v_BxV @ params["W"]), -1)


def sample_h(key, params, v_BxV, *, compute_dtype=None, uniform_bits: int = 32):
    return _bernoulli(key, hidden_probs(params, v_BxV, compute_dtype=compute_dtype), uniform_bits)


def sample_v(key, params, h_BxH, *, compute_dtype=None, uniform_bits: int = 32):
    return _bernoulli(key, visible_probs(params, h_BxH, compute_dtype=compute_dtype), uniform_bits)


def gibbs_sweep(key, params, v_BxV, *, compute_dtype=None, uniform_bits: int = 32):
    """One block-Gibbs sweep v -> h -> v."""
    kh, kv = jax.random.split(key)
    h = sample_h(kh, params, v_BxV, compute_dtype=compute_dtype, uniform_bits=uniform_bits)
    return sample_v(kv, params, h, compute_dtype=compute_dtype, uniform_bits=uniform_bits)


def _chain(sweep, key, params, v0, num_steps: int, keep_history: bool, **opts):
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")

    def body(v, i):
        v = sweep(jax.random.fold_in(key, i), params, v, **opts)
        return v, (v if keep_history else None)

    v, hist = jax.lax.scan(body, v0.astype(jnp.float32), jnp.arange(num_steps))
    return (v, hist) if keep_history else v


def run_chain(key, params, v0_BxV, num_steps: int, *, keep_history: bool = False, compute_dtype=None,
              uniform_bits: int = 32):
    """num_steps Gibbs sweeps as one lax.scan -> final v [B, V] (and history [K, B, V] if asked).

    compute_dtype=jnp.bfloat16: bf16 matmuls, f32 accumulation. uniform_bits=16: see _bernoulli.
    """
    _check(params, v0_BxV)
    return _chain(gibbs_sweep, key, params, v0_BxV, num_steps, keep_history,
                  compute_dtype=compute_dtype, uniform_bits=uniform_bits)


def cd_loss(params, key, v_data_BxV, k: int = 1, v_chain=None, *, compute_dtype=None):
    """CD-k surrogate mean F(v_data) - mean F(sg(v_k)) -> (loss, v_k).

    Its gradient is -(<v h>_data - <v h>_k) etc. (positive minus negative statistics, negated).
    The chain starts at v_data (CD) or at v_chain (PCD), and v_k is returned so PCD can keep it.
    """
    return _cd(free_energy, run_chain, params, key, v_data_BxV, k, v_chain, compute_dtype)


def _cd(free_energy_fn, chain_fn, params, key, v_data, k, v_chain, compute_dtype):
    if k < 1:
        raise ValueError(f"CD needs k >= 1 Gibbs sweeps, got k={k}")
    v0 = v_data if v_chain is None else v_chain
    v_k = jax.lax.stop_gradient(chain_fn(key, params, v0, k, compute_dtype=compute_dtype))
    return jnp.mean(free_energy_fn(params, v_data)) - jnp.mean(free_energy_fn(params, v_k)), v_k


# ---- partition function ----

def _all_states(n: int, start: int, count: int):
    idx = start + jnp.arange(count, dtype=jnp.uint32)
    return ((idx[:, None] >> jnp.arange(n, dtype=jnp.uint32)) & 1).astype(jnp.float32)


def exact_log_partition(params, *, chunk: int = 2**16):
    """log Z by enumerating the smaller layer (<= 24 units): sums 2^min(V, H) terms."""
    _check(params)
    V, H = params["W"].shape
    n = min(V, H)
    if n > MAX_ENUMERATED_UNITS:
        raise ValueError(f"exact_log_partition enumerates the smaller layer: {n} units is above "
                         f"{MAX_ENUMERATED_UNITS} (2^{n} states); use ais_log_partition")

    if V <= H:  # -F(v) summed over all v
        neg_f = lambda s: -free_energy(params, s)
    else:       # the same with the roles swapped: -F(h) = h.c + sum_i softplus(b_i + (W h)_i)
        neg_f = lambda s: s @ params["c"] + jnp.sum(jax.nn.softplus(params["b"] + s @ params["W"].T), -1)
    total, count = 2**n, min(chunk, 2**n)
    parts = [jax.nn.logsumexp(jax.jit(neg_f)(_all_states(n, s, count))) for s in range(0, total, count)]
    return jax.nn.logsumexp(jnp.stack(parts))


def ais_log_partition(key, params, num_chains: int, num_betas: int, *, data_mean=None):
    """AIS estimate of log Z (Salakhutdinov & Murray 2008) -> (log_Z, std_err).

    Base model: W = 0, hidden bias 0, visible bias logit(data_mean) when given (the data's pixel
    marginals, clipped to [1e-3, 1 - 1e-3]) else 0. Temperatures: num_betas linearly spaced in
    [0, 1]. std_err is the delta-method standard error of log Z from the spread of the weights.
    """
    _check(params)
    if num_chains < 1 or num_betas < 2:
        raise ValueError(f"AIS needs num_chains >= 1 and num_betas >= 2; got {num_chains}, {num_betas}")
    V, H = params["W"].shape
    if data_mean is None:
        b_a = jnp.zeros((V,), jnp.float32)
    else:
        m = jnp.clip(jnp.asarray(data_mean, jnp.float32).reshape(-1), 1e-3, 1 - 1e-3)
        b_a = jnp.log(m) - jnp.log1p(-m)
    log_z_a = jnp.sum(jax.nn.softplus(b_a)) + H * math.log(2.0)

    def log_f(v, beta):  # log of the unnormalised, hidden-marginalised tempered model
        # at beta = 0 the softplus sum is H log 2: the base model's free hidden units
        return ((1 - beta) * (v @ b_a) + beta * (v @ params["b"])
                + jnp.sum(jax.nn.softplus(beta * (params["c"] + v @ params["W"])), -1))

    def transition(k, v, beta):
        kh, kv = jax.random.split(k)
        h = _bernoulli(kh, jax.nn.sigmoid(beta * (params["c"] + v @ params["W"])))
        return _bernoulli(kv, jax.nn.sigmoid((1 - beta) * b_a + beta * (params["b"] + h @ params["W"].T)))

    betas = jnp.linspace(0.0, 1.0, num_betas)
    k0, kchain = jax.random.split(key)
    v0 = _bernoulli(k0, jnp.broadcast_to(jax.nn.sigmoid(b_a), (num_chains, V)))

    def body(carry, i):
        v, log_w = carry
        log_w = log_w + log_f(v, betas[i]) - log_f(v, betas[i - 1])
        v = transition(jax.random.fold_in(kchain, i), v, betas[i])
        return (v, log_w), None

    (_, log_w), _ = jax.lax.scan(body, (v0, jnp.zeros((num_chains,))), jnp.arange(1, num_betas))
    log_mean_w = jax.nn.logsumexp(log_w) - math.log(num_chains)
    w = jnp.exp(log_w - jnp.max(log_w))
    std_err = jnp.std(w) / (jnp.mean(w) * math.sqrt(num_chains))
    return log_z_a + log_mean_w, std_err


def log_likelihood(params, v_BxV, log_z):
    """log p(v) = -F(v) - log Z per example: [B]."""
    return -free_energy(params, v_BxV) - log_z


# ---- Gaussian-Bernoulli RBM ----

def _sigma2(params):
    return jnp.exp(2.0 * params["log_sigma"]) if "log_sigma" in params else jnp.ones_like(params["b"])


def grbm_free_energy(params, v_BxV):
    """F(v) = sum (v - b)^2 / (2 sigma^2) - sum_j softplus(c_j + ((v / sigma^2) W)_j): [B]."""
    _check(params, v_BxV)
    s2 = _sigma2(params)
    quad = jnp.sum((v_BxV - params["b"]) ** 2 / (2 * s2), -1)
    return quad - jnp.sum(jax.nn.softplus(params["c"] + (v_BxV / s2) @ params["W"]), -1)


def grbm_hidden_probs(params, v_BxV, *, compute_dtype=None):
    return jax.nn.sigmoid(params["c"] + _dot(v_BxV / _sigma2(params), params["W"], compute_dtype))


def grbm_visible_mean(params, h_BxH, *, compute_dtype=None):
    return params["b"] + _dot(h_BxH, params["W"].T, compute_dtype)


def grbm_sample_v(key, params, h_BxH, *, compute_dtype=None):
    """v ~ N(b + W h, sigma^2)."""
    mean = grbm_visible_mean(params, h_BxH, compute_dtype=compute_dtype)
    return mean + jnp.sqrt(_sigma2(params)) * jax.random.normal(key, mean.shape)


def grbm_gibbs_sweep(key, params, v_BxV, *, compute_dtype=None):
    kh, kv = jax.random.split(key)
    h = _bernoulli(kh, grbm_hidden_probs(params, v_BxV, compute_dtype=compute_dtype))
    return grbm_sample_v(kv, params, h, compute_dtype=compute_dtype)


def grbm_run_chain(key, params, v0_BxV, num_steps: int, *, keep_history: bool = False, compute_dtype=None):
    _check(params, v0_BxV)
    return _chain(grbm_gibbs_sweep, key, params, v0_BxV, num_steps, keep_history, compute_dtype=compute_dtype)


def grbm_cd_loss(params, key, v_data_BxV, k: int = 1, v_chain=None, *, compute_dtype=None):
    """CD-k surrogate for the Gaussian-Bernoulli RBM -> (loss, v_k); see cd_loss."""
    return _cd(grbm_free_energy, grbm_run_chain, params, key, v_data_BxV, k, v_chain, compute_dtype)
