"""Restricted Boltzmann machines as pure functions: energies, conditionals, Gibbs chains, CD-k/PCD,
and the partition function (exact enumeration for tiny models, AIS otherwise).

Bernoulli RBM (Hinton 2002, "Training products of experts by minimizing contrastive divergence"):
  E(v, h) = -v.b - h.c - v W h,   F(v) = -log sum_h exp(-E) = -v.b - sum_j softplus(c_j + (v W)_j),
  p(h_j = 1 | v) = sigmoid(c_j + (v W)_j),   p(v_i = 1 | h) = sigmoid(b_i + (W h)_i).
CD-k (Hinton 2002) is the gradient of mean F(v_data) - mean F(sg(v_k)); PCD (Tieleman 2008,
"Training RBMs using approximations to the likelihood gradient") starts the chain at the previous
update's end state instead of at the data. AIS: Salakhutdinov & Murray 2008, "On the quantitative
analysis of deep belief networks" (Sec. 3-4: base-rate model, tempered transitions, weights).
Gaussian-Bernoulli RBM (Krizhevsky 2009, "Learning multiple layers of features from tiny images",
App. 1; Cho, Ilin & Raiko 2011, "Improved learning of Gaussian-Bernoulli RBMs"), per-pixel sigma:
  E(v, h) = sum_i (v_i - b_i)^2 / (2 sigma_i^2) - h.c - (v / sigma^2) W h,
  F(v) = sum_i (v_i - b_i)^2 / (2 sigma_i^2) - sum_j softplus(c_j + ((v / sigma^2) W)_j),
  p(v | h) = N(b + W h, sigma^2),   p(h_j = 1 | v) = sigmoid(c_j + ((v / sigma^2) W)_j).

Params: {"W": [V, H], "b": [V] visible bias, "c": [H] hidden bias}; a GRBM may add
"log_sigma": [V] (absent = unit variance).

Uniforms. Binary units are sampled as `u < p`. `uniforms="hash"` (the default) draws two 32-bit
seeds per call from the key (any key: threefry, rbg, ...) and hashes each element's position with
an integer mixer (lowbias32, twice): ~12 integer ops per element that XLA fuses into the
sigmoid/compare, so a large chain costs its two matmuls per sweep. `uniforms="threefry"` calls
jax.random.uniform with the key (jax.random's own streams). Measured on a 2-core AVX2 CPU,
interleaved runs, chain-steps/s: at 784x500 B1024 K20 threefry keys 64k, rbg 37k, unsafe_rbg 40k
(XLA's RngBitGenerator is slower than threefry on CPU, so rbg keys bring nothing there), drawing a
whole sweep's uniforms in one call 56k (no gain), hash 94k vs a same-run matmul ceiling of 84-110k;
at 64x256 B4096 K50 hash is 2.9x threefry.

Implementations of run_chain (and so cd_loss): "xla", one lax.scan of gibbs_sweep; "native", a C++
kernel for the CPU (zoo/ops/csrc/gibbs.cc through zoo.ops.native): tasks of 128 chains run all
sweeps without synchronising, with the same hash uniforms (so the same chain for a key), and
GEMMs in Intel AMX as bf16x3 (states are 0 / 1, exact in bf16; W as three bf16 parts: float32
accuracy) or in float32 FMA. Auto (None) takes "native" on CPU for float32 W, hash uniforms and
compute_dtype None where the kernel builds, from 5 sweeps and 500 chains x sweeps per call (so
CD-1 training stays on XLA, where packing W each call would cost more than the chain). Measured
at 784x500 B1024 K20 on a 2-core AVX-512 + AMX CPU: 200k chain-steps/s vs 109k for the scan and
64k for NumPy (benchmarks/results/README.md).

Shape letters: B batch (chains), V visible units, H hidden units, K sweeps / temperatures.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from zoo.ops import native

MAX_ENUMERATED_UNITS = 24
UNIFORMS = ("hash", "threefry")


def _check(params, v_BxV=None, *, h_BxH=None) -> None:
    W = params["W"]
    if W.ndim != 2 or params["b"].shape != (W.shape[0],) or params["c"].shape != (W.shape[1],):
        raise ValueError(f"RBM params need W [V, H], b [V], c [H]; got W {W.shape}, "
                         f"b {params['b'].shape}, c {params['c'].shape}")
    if "log_sigma" in params and params["log_sigma"].shape != (W.shape[0],):
        raise ValueError(f"log_sigma must be [V] = ({W.shape[0]},); got {params['log_sigma'].shape}")
    if v_BxV is not None and (v_BxV.ndim != 2 or v_BxV.shape[1] != W.shape[0]):
        raise ValueError(f"visible units: v has shape {v_BxV.shape}, expected [B, {W.shape[0]}] "
                         f"for W of shape {W.shape}")
    if h_BxH is not None and (h_BxH.ndim != 2 or h_BxH.shape[1] != W.shape[1]):
        raise ValueError(f"hidden units: h has shape {h_BxH.shape}, expected [B, {W.shape[1]}] "
                         f"for W of shape {W.shape}")


def _dot(x, w, compute_dtype=None):
    """x @ w, optionally in compute_dtype (e.g. bf16) with float32 accumulation."""
    if compute_dtype is None:
        return jnp.dot(x, w)
    return jnp.dot(x.astype(compute_dtype), w.astype(compute_dtype), preferred_element_type=jnp.float32)


def _mix32(x):
    """lowbias32 (C. Wellons' hash prospector): a bijection on uint32 with near-ideal avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def uniform(key, shape, *, uniforms: str = "hash"):
    """Float32 uniforms in [0, 1) (23-bit grid); see the module docstring for the two methods."""
    if uniforms == "threefry":
        return jax.random.uniform(key, shape, jnp.float32)
    if uniforms != "hash":
        raise ValueError(f"uniforms must be one of {UNIFORMS}, got {uniforms!r}")
    s = jax.random.bits(key, (2,), jnp.uint32)
    # each element's position within the call (distinct below 2^32 elements); iota shards like the array
    idx = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    x = _mix32(_mix32(idx ^ s[0]) + s[1])
    # top 23 bits as the mantissa of a float in [1, 2), minus 1 (what jax.random.uniform does)
    return jax.lax.bitcast_convert_type((x >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0


def _bernoulli(key, p, dtype, uniforms):
    return (uniform(key, p.shape, uniforms=uniforms) < p).astype(dtype)


# ---- Bernoulli RBM ----

def energy(params, v_BxV, h_BxH):
    """E(v, h) per example: [B]."""
    _check(params, v_BxV, h_BxH=h_BxH)
    return -(v_BxV @ params["b"]) - (h_BxH @ params["c"]) - jnp.sum((v_BxV @ params["W"]) * h_BxH, -1)


def free_energy(params, v_BxV):
    """F(v) = -log sum_h exp(-E(v, h)) per example: [B]."""
    _check(params, v_BxV)
    return -(v_BxV @ params["b"]) - jnp.sum(jax.nn.softplus(params["c"] + v_BxV @ params["W"]), -1)


def hidden_probs(params, v_BxV, *, compute_dtype=None):
    """p(h = 1 | v): [B, H]."""
    _check(params, v_BxV)
    return jax.nn.sigmoid(params["c"] + _dot(v_BxV, params["W"], compute_dtype))


def visible_probs(params, h_BxH, *, compute_dtype=None):
    """p(v = 1 | h): [B, V]."""
    _check(params, h_BxH=h_BxH)
    return jax.nn.sigmoid(params["b"] + _dot(h_BxH, params["W"].T, compute_dtype))


def sample_h(key, params, v_BxV, *, compute_dtype=None, uniforms: str = "hash"):
    """Binary h ~ p(h | v) in v's dtype: [B, H]."""
    return _bernoulli(key, hidden_probs(params, v_BxV, compute_dtype=compute_dtype), v_BxV.dtype, uniforms)


def sample_v(key, params, h_BxH, *, compute_dtype=None, uniforms: str = "hash"):
    """Binary v ~ p(v | h) in h's dtype: [B, V]."""
    return _bernoulli(key, visible_probs(params, h_BxH, compute_dtype=compute_dtype), h_BxH.dtype, uniforms)


def gibbs_sweep(key, params, v_BxV, *, compute_dtype=None, uniforms: str = "hash"):
    """One block-Gibbs sweep v -> h -> v."""
    kh, kv = jax.random.split(key)
    h = sample_h(kh, params, v_BxV, compute_dtype=compute_dtype, uniforms=uniforms)
    return sample_v(kv, params, h, compute_dtype=compute_dtype, uniforms=uniforms)


def _chain(sweep, key, params, v0, num_steps: int, keep_history: bool, compute_dtype, **opts):
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if compute_dtype is not None:  # cast W once, outside the loop
        params = dict(params, W=params["W"].astype(compute_dtype))

    def body(v, i):
        v = sweep(jax.random.fold_in(key, i), params, v, compute_dtype=compute_dtype, **opts)
        return v, (v if keep_history else None)

    v, hist = jax.lax.scan(body, v0, jnp.arange(num_steps))
    return (v, hist) if keep_history else v


CHAIN_IMPLEMENTATIONS = ("xla", "native")
# auto takes "native" from this many sweeps and chain-sweeps (B x K) per call: below, packing W
# (twice, as bf16 parts for AMX) and starting threads outweigh the chain. Measured on 2 cores
# (AVX-512 + AMX), native / xla time: 784x500 B100 K1 2.6 / 1.1 ms, B32 K5 2.9 / 2.1, B100 K5
# 6.1 / 7.2, B32 K20 7.1 / 7.9, B1024 K20 123 / 224; 64x100 B256 K1 0.25 / 0.18, B100 K5 0.26 /
# 0.35 (benchmarks/results/README.md "CPU Gibbs: a native chain").
CHAIN_NATIVE_MIN_STEPS = 5
CHAIN_NATIVE_MIN_CHAIN_STEPS = 500


def _native_applies(params, v0, compute_dtype, uniforms) -> bool:
    return (compute_dtype is None and uniforms == "hash" and params["W"].dtype == jnp.float32
            and jnp.issubdtype(v0.dtype, jnp.floating))


def _chain_implementation(implementation, params, v0, compute_dtype, uniforms, num_steps) -> str:
    if implementation is not None and implementation not in CHAIN_IMPLEMENTATIONS:
        raise ValueError(f"unknown chain implementation {implementation!r}; expected one of "
                         f"{CHAIN_IMPLEMENTATIONS} or None (auto)")
    applies = _native_applies(params, v0, compute_dtype, uniforms)
    if implementation == "native":
        if not applies:
            raise ValueError('implementation="native" needs float32 W, a floating v0, compute_dtype=None and '
                             f'uniforms="hash"; got W {params["W"].dtype}, v0 {v0.dtype}, compute_dtype '
                             f'{compute_dtype}, uniforms {uniforms!r}')
        if not native.available():
            raise native.NativeUnavailable(f"the native kernels are unavailable: {native.unavailable_reason()}")
        return "native"
    worth_it = num_steps >= CHAIN_NATIVE_MIN_STEPS and v0.shape[0] * num_steps >= CHAIN_NATIVE_MIN_CHAIN_STEPS
    if implementation is None and applies and worth_it and jax.default_backend() == "cpu" and native.available():
        return "native"
    return "xla"


def _native_chain(key, params, v0, num_steps, keep_history, **kernel_opts):
    """run_chain by the C++ kernel, with the seeds each half-sweep's hash uniforms would draw;
    kernel_opts go to native.gibbs_chain (method, block_rows)."""
    def seeds_of(i):  # what gibbs_sweep(fold_in(key, i)) gives sample_h and sample_v
        return jnp.stack([jax.random.bits(k, (2,), jnp.uint32)
                          for k in jax.random.split(jax.random.fold_in(key, i))])

    B = v0.shape[0]
    seeds = jax.vmap(seeds_of)(jnp.arange(num_steps))  # [K, 2, 2]
    params = jax.lax.stop_gradient(params)  # a sample: no gradient flows through the chain
    out = native.gibbs_chain(jax.lax.stop_gradient(v0), jnp.broadcast_to(seeds, (B,) + seeds.shape),
                             jnp.arange(B, dtype=jnp.uint32), params["W"], params["b"], params["c"],
                             keep_history=keep_history, **kernel_opts).astype(v0.dtype)
    return (out[:, -1], jnp.swapaxes(out, 0, 1)) if keep_history else out[:, 0]


def run_chain(key, params, v0_BxV, num_steps: int, *, keep_history: bool = False, compute_dtype=None,
              uniforms: str = "hash", implementation: str | None = None):
    """num_steps Gibbs sweeps -> final v [B, V] (or (final, history [K, B, V])).

    compute_dtype=jnp.bfloat16: bf16 matmuls with float32 accumulation; sampling stays in float32.
    The chain state keeps v0's dtype.
    implementation: "xla" (one lax.scan of gibbs_sweep), "native" (a C++ kernel for the CPU,
    zoo.ops.native: float32 W, compute_dtype None, hash uniforms; the same uniforms as "xla", so
    the same chain for a key up to float32 rounding deciding a comparison differently, ~1e-7 per
    unit), or None: "native" on CPU where it applies and builds, for at least 5 sweeps and 500
    chain-sweeps (B x num_steps; below, packing W costs more than it saves), else "xla".
    """
    _check(params, v0_BxV)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if _chain_implementation(implementation, params, v0_BxV, compute_dtype, uniforms, num_steps) == "native":
        return _native_chain(key, params, v0_BxV, num_steps, keep_history)
    return _chain(gibbs_sweep, key, params, v0_BxV, num_steps, keep_history, compute_dtype, uniforms=uniforms)


def _cd(free_energy_fn, chain_fn, params, key, v_data, k, v_chain, **opts):
    if k < 1:
        raise ValueError(f"CD needs k >= 1 Gibbs sweeps, got k={k}")
    _check(params, v_data)
    v0 = v_data if v_chain is None else v_chain
    v_k = jax.lax.stop_gradient(chain_fn(key, jax.lax.stop_gradient(params), v0, k, **opts))
    return jnp.mean(free_energy_fn(params, v_data)) - jnp.mean(free_energy_fn(params, v_k)), v_k


def cd_loss(params, key, v_data_BxV, k: int = 1, v_chain=None, *, compute_dtype=None, uniforms: str = "hash",
            implementation: str | None = None):
    """CD-k surrogate mean F(v_data) - mean F(sg(v_k)) -> (loss, v_k).

    Its gradient is minus (positive - negative statistics): dW = -(<v p(h|v)>_data - <v p(h|v)>_k).
    The chain starts at v_data (CD) or at v_chain (PCD, any batch size), and v_k is returned so
    PCD can keep it. implementation: the chain's (see run_chain).
    """
    return _cd(free_energy, run_chain, params, key, v_data_BxV, k, v_chain,
               compute_dtype=compute_dtype, uniforms=uniforms, implementation=implementation)


# ---- partition function ----

def _neg_free_energy_of_hidden(params, h_BxH):
    """-F(h) = h.c + sum_i softplus(b_i + (W h)_i): the visible layer summed out."""
    return h_BxH @ params["c"] + jnp.sum(jax.nn.softplus(params["b"] + h_BxH @ params["W"].T), -1)


def exact_log_partition(params, *, chunk: int = 2**16):
    """log Z by enumerating the smaller layer (<= 24 units) in chunks of `chunk` states."""
    _check(params)
    V, H = params["W"].shape
    n = min(V, H)
    if n > MAX_ENUMERATED_UNITS:
        raise ValueError(f"exact_log_partition enumerates the smaller layer: {n} units (W is {V}x{H}) is "
                         f"above {MAX_ENUMERATED_UNITS} (2^{n} states); use ais_log_partition")
    neg_f = (lambda s: -free_energy(params, s)) if V <= H else (lambda s: _neg_free_energy_of_hidden(params, s))
    count = min(chunk, 2**n)
    num_chunks = -(-2**n // count)

    @jax.jit
    def total():
        def part(start):
            idx = start + jnp.arange(count, dtype=jnp.uint32)
            states = ((idx[:, None] >> jnp.arange(n, dtype=jnp.uint32)) & 1).astype(jnp.float32)
            return jax.nn.logsumexp(jnp.where(idx < 2**n, neg_f(states), -jnp.inf))
        starts = jnp.arange(num_chunks, dtype=jnp.uint32) * jnp.uint32(count)
        return jax.nn.logsumexp(jax.lax.map(part, starts))

    return total()


def _betas(num_betas: int, schedule: str):
    if schedule == "linear":
        return jnp.linspace(0.0, 1.0, num_betas)
    if schedule == "three_piece":  # S&M 2008: 1,000 / 4,000 / 10,000 steps on [0,.5] / [.5,.9] / [.9,1]
        n1, n2 = max(1, round(num_betas / 15)), max(1, round(num_betas * 4 / 15))
        n3 = max(1, num_betas - n1 - n2 - 1)
        return jnp.concatenate([jnp.linspace(0.0, 0.5, n1, endpoint=False),
                                jnp.linspace(0.5, 0.9, n2, endpoint=False), jnp.linspace(0.9, 1.0, n3 + 1)])
    raise ValueError(f"schedule must be 'linear' or 'three_piece', got {schedule!r}")


def ais_log_partition(key, params, num_chains: int, num_betas: int, *, base_visible_bias=None, data_mean=None,
                      schedule: str = "linear", uniforms: str = "hash"):
    """AIS estimate of log Z (Salakhutdinov & Murray 2008) -> (log_Z, spread).

    Base model: W = 0, hidden bias 0, visible bias `base_visible_bias`, or logit(data_mean) (the
    data's pixel marginals, clipped to [1e-3, 1 - 1e-3]), else 0. Temperatures: num_betas points
    on [0, 1], linear or the S&M three-piece schedule. One lax.scan over temperatures.
    log_Z = log_Z_base + logmeanexp(log w); spread = std(w) / (mean(w) sqrt(num_chains)), the
    delta-method standard error of log_Z (nats; it understates the error when the weights are
    heavy-tailed, as every AIS error bar does).
    """
    _check(params)
    if num_chains < 1 or num_betas < 2:
        raise ValueError(f"AIS needs num_chains >= 1 and num_betas >= 2; got {num_chains}, {num_betas}")
    V, H = params["W"].shape
    if base_visible_bias is not None and data_mean is not None:
        raise ValueError("give base_visible_bias or data_mean, not both")
    if base_visible_bias is not None:
        b_a = jnp.asarray(base_visible_bias, jnp.float32).reshape(-1)
    elif data_mean is not None:
        m = jnp.clip(jnp.asarray(data_mean, jnp.float32).reshape(-1), 1e-3, 1 - 1e-3)
        b_a = jnp.log(m) - jnp.log1p(-m)
    else:
        b_a = jnp.zeros((V,), jnp.float32)
    if b_a.shape != (V,):
        raise ValueError(f"base visible bias / data_mean has {b_a.shape[0]} units, W is {V}x{H}")
    log_z_a = jnp.sum(jax.nn.softplus(b_a)) + H * math.log(2.0)
    W, b, c = params["W"], params["b"], params["c"]

    def log_f(v, beta):  # log of the tempered model with h summed out; at beta = 0: v.b_a + H log 2
        return (1 - beta) * (v @ b_a) + beta * (v @ b) + jnp.sum(jax.nn.softplus(beta * (c + v @ W)), -1)

    def transition(k, v, beta):  # one Gibbs sweep that leaves the beta-tempered model invariant
        kh, kv = jax.random.split(k)
        h = _bernoulli(kh, jax.nn.sigmoid(beta * (c + v @ W)), jnp.float32, uniforms)
        return _bernoulli(kv, jax.nn.sigmoid((1 - beta) * b_a + beta * (b + h @ W.T)), jnp.float32, uniforms)

    betas = _betas(num_betas, schedule)
    k0, kchain = jax.random.split(key)
    v0 = _bernoulli(k0, jnp.broadcast_to(jax.nn.sigmoid(b_a), (num_chains, V)), jnp.float32, uniforms)

    def body(carry, i):
        v, log_w = carry
        log_w = log_w + log_f(v, betas[i]) - log_f(v, betas[i - 1])
        return (transition(jax.random.fold_in(kchain, i), v, betas[i]), log_w), None

    (_, log_w), _ = jax.lax.scan(body, (v0, jnp.zeros((num_chains,))), jnp.arange(1, betas.shape[0]))
    log_mean_w = jax.nn.logsumexp(log_w) - math.log(num_chains)
    w = jnp.exp(log_w - jnp.max(log_w))
    return log_z_a + log_mean_w, jnp.std(w) / (jnp.mean(w) * math.sqrt(num_chains))


def log_likelihood(params, v_BxV, log_Z):
    """log p(v) = -F(v) - log Z per example: [B]."""
    return -free_energy(params, v_BxV) - log_Z


# ---- Gaussian-Bernoulli RBM ----

def _sigma2(params):
    return jnp.exp(2.0 * params["log_sigma"]) if "log_sigma" in params else jnp.ones_like(params["b"])


def grbm_energy(params, v_BxV, h_BxH):
    """E(v, h) = sum (v - b)^2 / (2 sigma^2) - h.c - (v / sigma^2) W h: [B]."""
    _check(params, v_BxV, h_BxH=h_BxH)
    s2 = _sigma2(params)
    return (jnp.sum((v_BxV - params["b"]) ** 2 / (2 * s2), -1) - h_BxH @ params["c"]
            - jnp.sum(((v_BxV / s2) @ params["W"]) * h_BxH, -1))


def grbm_free_energy(params, v_BxV):
    """F(v) = sum (v - b)^2 / (2 sigma^2) - sum_j softplus(c_j + ((v / sigma^2) W)_j): [B]."""
    _check(params, v_BxV)
    s2 = _sigma2(params)
    quad = jnp.sum((v_BxV - params["b"]) ** 2 / (2 * s2), -1)
    return quad - jnp.sum(jax.nn.softplus(params["c"] + (v_BxV / s2) @ params["W"]), -1)


def grbm_hidden_probs(params, v_BxV, *, compute_dtype=None):
    """p(h = 1 | v) = sigmoid(c + (v / sigma^2) W): [B, H]."""
    _check(params, v_BxV)
    return jax.nn.sigmoid(params["c"] + _dot(v_BxV / _sigma2(params), params["W"], compute_dtype))


def grbm_visible_mean(params, h_BxH, *, compute_dtype=None):
    """E[v | h] = b + W h: [B, V]."""
    _check(params, h_BxH=h_BxH)
    return params["b"] + _dot(h_BxH, params["W"].T, compute_dtype)


def grbm_sample_v(key, params, h_BxH, *, compute_dtype=None):
    """v ~ N(b + W h, sigma^2) in float32: [B, V]."""
    mean = grbm_visible_mean(params, h_BxH, compute_dtype=compute_dtype).astype(jnp.float32)
    return mean + jnp.sqrt(_sigma2(params)) * jax.random.normal(key, mean.shape, jnp.float32)


def grbm_gibbs_sweep(key, params, v_BxV, *, compute_dtype=None, uniforms: str = "hash"):
    """One block-Gibbs sweep v -> h -> v for the Gaussian-Bernoulli RBM."""
    kh, kv = jax.random.split(key)
    h = _bernoulli(kh, grbm_hidden_probs(params, v_BxV, compute_dtype=compute_dtype), jnp.float32, uniforms)
    return grbm_sample_v(kv, params, h, compute_dtype=compute_dtype).astype(v_BxV.dtype)


def grbm_run_chain(key, params, v0_BxV, num_steps: int, *, keep_history: bool = False, compute_dtype=None,
                   uniforms: str = "hash"):
    """num_steps GRBM sweeps as one lax.scan; see run_chain."""
    _check(params, v0_BxV)
    return _chain(grbm_gibbs_sweep, key, params, v0_BxV, num_steps, keep_history, compute_dtype, uniforms=uniforms)


def grbm_cd_loss(params, key, v_data_BxV, k: int = 1, v_chain=None, *, compute_dtype=None, uniforms: str = "hash"):
    """CD-k / PCD surrogate for the Gaussian-Bernoulli RBM -> (loss, v_k); see cd_loss."""
    return _cd(grbm_free_energy, grbm_run_chain, params, key, v_data_BxV, k, v_chain,
               compute_dtype=compute_dtype, uniforms=uniforms)
