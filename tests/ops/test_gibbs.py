"""RBM ops against NumPy enumeration, closed forms and hand-computed CD statistics."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import gibbs


def rbm(V, H, scale=1.0, seed=0):
    r = np.random.default_rng(seed)
    return {"W": jnp.asarray(r.normal(0, scale, (V, H)), jnp.float32),
            "b": jnp.asarray(r.normal(0, 0.5, V), jnp.float32),
            "c": jnp.asarray(r.normal(0, 0.5, H), jnp.float32)}


def np_states(n):
    return np.array(list(itertools.product([0, 1], repeat=n)), np.float64)


def np_log_z(p):
    W, b, c = (np.asarray(p[k], np.float64) for k in ("W", "b", "c"))
    V, H = W.shape
    vs, hs = np_states(V), np_states(H)
    neg_e = vs @ b[:, None] + (hs @ c)[None, :] + vs @ W @ hs.T  # [2^V, 2^H]
    m = neg_e.max()
    return m + np.log(np.exp(neg_e - m).sum())


@pytest.mark.parametrize("V, H", [(5, 4), (3, 7)])  # enumerates v, then h
def test_exact_log_partition_vs_numpy_double_sum(V, H):
    p = rbm(V, H, seed=V)
    np.testing.assert_allclose(float(gibbs.exact_log_partition(p)), np_log_z(p), rtol=1e-5)


def test_exact_log_partition_chunks_and_limit():
    p = rbm(6, 30, 0.1)
    np.testing.assert_allclose(float(gibbs.exact_log_partition(p, chunk=8)),
                               float(gibbs.exact_log_partition(p)), rtol=1e-5)
    with pytest.raises(ValueError, match="above 24"):
        gibbs.exact_log_partition(rbm(25, 25))


def test_free_energy_closed_form_and_energy():
    p = rbm(5, 4, seed=3)
    W, b, c = (np.asarray(p[k], np.float64) for k in ("W", "b", "c"))
    vs, hs = np_states(5), np_states(4)
    neg_e = vs @ b[:, None] + (hs @ c)[None, :] + vs @ W @ hs.T
    f_enum = -np.log(np.exp(neg_e).sum(1))
    np.testing.assert_allclose(np.asarray(gibbs.free_energy(p, jnp.asarray(vs, jnp.float32))), f_enum, rtol=1e-5)
    v, h = vs[7:8], hs[5:6]
    np.testing.assert_allclose(float(gibbs.energy(p, jnp.asarray(v, jnp.float32), jnp.asarray(h, jnp.float32))[0]),
                               -neg_e[7, 5], rtol=1e-5)


@pytest.mark.parametrize("V, H, scale", [(12, 10, 0.5), (20, 8, 0.4)])
def test_ais_within_0p1_nats_of_exact(V, H, scale):
    p = rbm(V, H, scale, seed=V + H)
    exact = float(gibbs.exact_log_partition(p))
    est, se = gibbs.ais_log_partition(jax.random.PRNGKey(0), p, 500, 2000)
    assert abs(float(est) - exact) < 0.1, (float(est), exact)
    assert 0 <= float(se) < 0.1
    data_mean = np.full(V, 0.3)
    est2, _ = gibbs.ais_log_partition(jax.random.PRNGKey(1), p, 500, 2000, data_mean=data_mean)
    assert abs(float(est2) - exact) < 0.1


def test_chain_long_run_matches_exact_distribution():
    p = rbm(4, 3, 1.0, seed=11)
    W, b, c = (np.asarray(p[k], np.float64) for k in ("W", "b", "c"))
    vs = np_states(4)
    neg_f = vs @ b + np.log1p(np.exp(c + vs @ W)).sum(1)
    exact = np.exp(neg_f - neg_f.max())
    exact /= exact.sum()
    v0 = jnp.zeros((4000, 4))
    for bits in (32, 16):
        hist = gibbs.run_chain(jax.random.PRNGKey(0), p, v0, 60, keep_history=True, uniform_bits=bits)[1]
        samples = np.asarray(hist[20:]).reshape(-1, 4)  # after burn-in
        codes = (samples * (2 ** np.arange(3, -1, -1))).sum(1).astype(int)
        emp = np.bincount(codes, minlength=16) / len(codes)
        assert 0.5 * np.abs(emp - exact).sum() < 0.03, bits


def test_cd1_gradient_is_positive_minus_negative_statistics():
    p = rbm(6, 5, 0.5, seed=2)
    v = jnp.asarray(np.random.default_rng(0).integers(0, 2, (8, 6)), jnp.float32)
    key = jax.random.PRNGKey(3)
    grads = jax.grad(lambda q: gibbs.cd_loss(q, key, v, k=1)[0])(p)
    _, v1 = gibbs.cd_loss(p, key, v, k=1)
    W, b, c = (np.asarray(p[k], np.float64) for k in ("W", "b", "c"))
    sig = lambda x: 1 / (1 + np.exp(-x))
    vd, vk = np.asarray(v, np.float64), np.asarray(v1, np.float64)
    hd, hk = sig(c + vd @ W), sig(c + vk @ W)
    n = len(vd)
    np.testing.assert_allclose(np.asarray(grads["W"]), -(vd.T @ hd - vk.T @ hk) / n, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads["b"]), -(vd - vk).mean(0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads["c"]), -(hd - hk).mean(0), atol=1e-5)
    # the chain moved: v1 is a fresh sample, not the data
    assert not np.array_equal(vd, vk)


def test_bf16_chain_statistics_match_f32():
    p = rbm(64, 32, 0.1, seed=5)
    v0 = jnp.zeros((2048, 64))
    key = jax.random.PRNGKey(0)
    m32 = float(jnp.mean(gibbs.run_chain(key, p, v0, 30)))
    m16 = float(jnp.mean(gibbs.run_chain(key, p, v0, 30, compute_dtype=jnp.bfloat16)))
    assert abs(m32 - m16) < 0.01


def test_grbm_free_energy_and_conditional():
    r = np.random.default_rng(0)
    V, H = 2, 3
    p = {"W": jnp.asarray(r.normal(0, 0.5, (V, H)), jnp.float32), "b": jnp.asarray([0.2, -0.1], jnp.float32),
         "c": jnp.asarray(r.normal(0, 0.5, H), jnp.float32), "log_sigma": jnp.asarray([0.1, -0.2], jnp.float32)}
    W, b, c, s2 = (np.asarray(p["W"], np.float64), np.asarray(p["b"], np.float64),
                   np.asarray(p["c"], np.float64), np.exp(2 * np.asarray(p["log_sigma"], np.float64)))
    v = r.normal(size=(5, V))
    hs = np_states(H)
    neg_e = (-((v - b) ** 2 / (2 * s2)).sum(1))[:, None] + (hs @ c)[None] + (v / s2) @ W @ hs.T
    np.testing.assert_allclose(np.asarray(gibbs.grbm_free_energy(p, jnp.asarray(v, jnp.float32))),
                               -np.log(np.exp(neg_e).sum(1)), rtol=1e-5)
    # p(v | h) = N(b + W h, sigma^2): check the sampler's moments
    h = jnp.ones((200000, H))
    vs = np.asarray(gibbs.grbm_sample_v(jax.random.PRNGKey(0), p, h))
    np.testing.assert_allclose(vs.mean(0), b + W.sum(1), atol=0.01)
    np.testing.assert_allclose(vs.var(0), s2, rtol=0.02)
    # unit variance when log_sigma is absent
    q = {k: p[k] for k in ("W", "b", "c")}
    np.testing.assert_allclose(np.asarray(gibbs.grbm_sample_v(jax.random.PRNGKey(1), q, h)).var(0), 1.0, rtol=0.02)


def test_16bit_uniforms_sample_the_right_probabilities():
    p = jnp.asarray([[0.0, 1e-3, 0.3, 0.5, 0.999, 1.0, 0.77]])
    draws = np.stack([np.asarray(gibbs._bernoulli(jax.random.PRNGKey(i), jnp.broadcast_to(p, (20000, 7)), 16))
                      for i in range(5)]).reshape(-1, 7)
    np.testing.assert_allclose(draws.mean(0), np.asarray(p[0]), atol=0.005)
    assert draws[:, 0].max() == 0 and draws[:, 5].min() == 1
    with pytest.raises(ValueError, match="uniform_bits"):
        gibbs._bernoulli(jax.random.PRNGKey(0), p, 8)


def test_bad_shapes_and_args():
    p = rbm(5, 4)
    with pytest.raises(ValueError, match="visible units"):
        gibbs.free_energy(p, jnp.zeros((2, 6)))
    with pytest.raises(ValueError, match="W \\[V, H\\]"):
        gibbs.free_energy(dict(p, b=jnp.zeros(3)), jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="k >= 1"):
        gibbs.cd_loss(p, jax.random.PRNGKey(0), jnp.zeros((2, 5)), k=0)
    with pytest.raises(ValueError, match="num_steps"):
        gibbs.run_chain(jax.random.PRNGKey(0), p, jnp.zeros((2, 5)), 0)
