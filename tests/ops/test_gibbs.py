"""RBM ops against NumPy enumeration, closed forms, quadrature and hand-computed CD statistics."""

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


def np_params(p):
    return tuple(np.asarray(p[k], np.float64) for k in ("W", "b", "c"))


def np_states(n):
    return np.array(list(itertools.product([0, 1], repeat=n)), np.float64)


def np_neg_energy_table(p):
    """-E(v, h) for every (v, h): [2^V, 2^H]."""
    W, b, c = np_params(p)
    vs, hs = np_states(W.shape[0]), np_states(W.shape[1])
    return vs @ b[:, None] + (hs @ c)[None, :] + vs @ W @ hs.T


def np_logsumexp(x, axis=None):
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True)), axis=axis)


def np_p_v(p):
    """Exact p(v) over all 2^V visible states, NumPy enumeration of both layers."""
    log_pv = np_logsumexp(np_neg_energy_table(p), axis=1)
    return np.exp(log_pv - np_logsumexp(log_pv))


@pytest.mark.parametrize("V, H", [(5, 4), (3, 7)])  # the smaller layer is h, then v
def test_exact_log_partition_vs_numpy_enumeration_of_both_layers(V, H):
    p = rbm(V, H, seed=V)
    np.testing.assert_allclose(float(gibbs.exact_log_partition(p)), np_logsumexp(np_neg_energy_table(p)), rtol=1e-5)


def test_exact_log_partition_enumerates_the_smaller_layer_in_chunks():
    # 6 x 30: only 2^6 visible states are summed; enumerating h would need 2^30
    p = rbm(6, 30, 0.1)
    W, b, c = np_params(p)
    vs = np_states(6)
    ref = np_logsumexp(vs @ b + np.logaddexp(0, c + vs @ W).sum(1))
    np.testing.assert_allclose(float(gibbs.exact_log_partition(p)), ref, rtol=1e-5)
    np.testing.assert_allclose(float(gibbs.exact_log_partition(p, chunk=8)), ref, rtol=1e-5)
    # and the transpose (30 x 6) enumerates h: same log Z
    pt = {"W": p["W"].T, "b": p["c"], "c": p["b"]}
    np.testing.assert_allclose(float(gibbs.exact_log_partition(pt, chunk=16)), ref, rtol=1e-5)


def test_exact_log_partition_limit():
    with pytest.raises(ValueError, match="above 24"):
        gibbs.exact_log_partition(rbm(25, 30))
    gibbs.exact_log_partition(rbm(20, 100, 0.05))  # 2^20 states, in chunks


def test_free_energy_closed_form_and_energy():
    p = rbm(5, 4, seed=3)
    W, b, c = np_params(p)
    vs, hs = np_states(5), np_states(4)
    neg_e = np_neg_energy_table(p)
    v32 = jnp.asarray(vs, jnp.float32)
    # -log sum_h exp(-E) and the NumPy closed form
    np.testing.assert_allclose(np.asarray(gibbs.free_energy(p, v32)), -np_logsumexp(neg_e, axis=1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gibbs.free_energy(p, v32)),
                               -vs @ b - np.logaddexp(0, c + vs @ W).sum(1), rtol=1e-5)
    e = gibbs.energy(p, jnp.asarray(vs[[7, 9]], jnp.float32), jnp.asarray(hs[[5, 2]], jnp.float32))
    np.testing.assert_allclose(np.asarray(e), -neg_e[[7, 9], [5, 2]], rtol=1e-5)


def test_conditionals_and_samples():
    p = rbm(6, 5, 0.5, seed=4)
    W, b, c = np_params(p)
    v = np.random.default_rng(0).integers(0, 2, (3, 6)).astype(np.float64)
    ph = np.asarray(gibbs.hidden_probs(p, jnp.asarray(v, jnp.float32)))
    np.testing.assert_allclose(ph, 1 / (1 + np.exp(-(c + v @ W))), rtol=1e-5)
    h = np.random.default_rng(1).integers(0, 2, (3, 5)).astype(np.float64)
    np.testing.assert_allclose(np.asarray(gibbs.visible_probs(p, jnp.asarray(h, jnp.float32))),
                               1 / (1 + np.exp(-(b + h @ W.T))), rtol=1e-5)
    vb = jnp.broadcast_to(jnp.asarray(v[:1], jnp.bfloat16), (40000, 6))
    for uniforms in gibbs.UNIFORMS:
        hs = gibbs.sample_h(jax.random.PRNGKey(0), p, vb, uniforms=uniforms)
        assert hs.dtype == jnp.bfloat16 and set(np.unique(np.asarray(hs, np.float32))) <= {0.0, 1.0}
        np.testing.assert_allclose(np.asarray(hs, np.float32).mean(0), ph[0], atol=0.01)


def test_hash_uniforms_are_uniform_and_independent():
    u = np.asarray(gibbs.uniform(jax.random.PRNGKey(0), (512, 1024))).ravel()
    assert 0.0 <= u.min() and u.max() < 1.0
    np.testing.assert_allclose(np.histogram(u, bins=16, range=(0, 1))[0] / u.size, 1 / 16, atol=1e-3)
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.005  # neighbours
    u2 = np.asarray(gibbs.uniform(jax.random.PRNGKey(1), (512, 1024))).ravel()
    assert abs(np.corrcoef(u, u2)[0, 1]) < 0.005  # keys
    with pytest.raises(ValueError, match="uniforms must be one of"):
        gibbs.uniform(jax.random.PRNGKey(0), (2, 2), uniforms="mt")


@pytest.mark.parametrize("V, H, scale", [(12, 10, 0.5), (20, 8, 0.4)])
def test_ais_within_0p1_nats_of_exact(V, H, scale):
    p = rbm(V, H, scale, seed=V + H)
    exact = float(gibbs.exact_log_partition(p))
    est, spread = gibbs.ais_log_partition(jax.random.PRNGKey(0), p, 400, 1500)
    assert abs(float(est) - exact) < 0.1, (float(est), exact)
    assert 0 <= float(spread) < 0.1
    est2, _ = gibbs.ais_log_partition(jax.random.PRNGKey(1), p, 400, 1500, data_mean=np.full(V, 0.3),
                                      schedule="three_piece")
    assert abs(float(est2) - exact) < 0.1, (float(est2), exact)


def test_log_likelihood_normalises():
    p = rbm(4, 3, seed=1)
    vs = jnp.asarray(np_states(4), jnp.float32)
    ll = gibbs.log_likelihood(p, vs, gibbs.exact_log_partition(p))
    np.testing.assert_allclose(float(jnp.sum(jnp.exp(ll))), 1.0, rtol=1e-5)


@pytest.mark.parametrize("uniforms", gibbs.UNIFORMS)
def test_chain_long_run_matches_exact_distribution(uniforms):
    p = rbm(4, 3, 1.0, seed=11)
    exact = np_p_v(p)
    hist = gibbs.run_chain(jax.random.PRNGKey(0), p, jnp.zeros((4000, 4)), 60, keep_history=True,
                           uniforms=uniforms)[1]
    assert hist.shape == (60, 4000, 4)
    samples = np.asarray(hist[20:]).reshape(-1, 4)  # after burn-in
    codes = (samples * (2 ** np.arange(3, -1, -1))).sum(1).astype(int)  # itertools.product order
    emp = np.bincount(codes, minlength=16) / len(codes)
    assert 0.5 * np.abs(emp - exact).sum() < 0.03


def test_cd1_gradient_is_positive_minus_negative_statistics():
    p = rbm(6, 5, 0.5, seed=2)
    v = jnp.asarray(np.random.default_rng(0).integers(0, 2, (8, 6)), jnp.float32)
    key = jax.random.PRNGKey(3)
    (loss, v1), grads = jax.value_and_grad(lambda q: gibbs.cd_loss(q, key, v, k=1), has_aux=True)(p)
    # the same sample by hand: one sweep from the data with the same key
    np.testing.assert_array_equal(np.asarray(v1), np.asarray(gibbs.run_chain(key, p, v, 1)))
    W, b, c = np_params(p)
    vd, vk = np.asarray(v, np.float64), np.asarray(v1, np.float64)
    hd, hk = 1 / (1 + np.exp(-(c + vd @ W))), 1 / (1 + np.exp(-(c + vk @ W)))
    n = len(vd)
    np.testing.assert_allclose(np.asarray(grads["W"]), -(vd.T @ hd - vk.T @ hk) / n, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads["b"]), -(vd - vk).mean(0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads["c"]), -(hd - hk).mean(0), atol=1e-5)
    f = lambda x: -x @ b - np.logaddexp(0, c + x @ W).sum(1)
    np.testing.assert_allclose(float(loss), f(vd).mean() - f(vk).mean(), rtol=1e-4)
    assert not np.array_equal(vd, vk)  # the chain moved


def test_pcd_starts_from_the_persistent_chain():
    p = rbm(6, 5, 0.5, seed=2)
    v_data, chains = jnp.zeros((8, 6)), jnp.ones((32, 6))
    key = jax.random.PRNGKey(5)
    _, v_k = gibbs.cd_loss(p, key, v_data, k=3, v_chain=chains)
    assert v_k.shape == (32, 6)
    np.testing.assert_array_equal(np.asarray(v_k), np.asarray(gibbs.run_chain(key, p, chains, 3)))


def test_bf16_chain_statistics_match_f32():
    p = rbm(64, 32, 0.1, seed=5)
    v0 = jnp.zeros((2048, 64))
    key = jax.random.PRNGKey(0)
    m32 = np.asarray(gibbs.run_chain(key, p, v0, 30)).mean(0)
    out16 = gibbs.run_chain(key, p, v0, 30, compute_dtype=jnp.bfloat16)
    assert out16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out16).mean(0), m32, atol=0.05)
    assert abs(float(out16.mean()) - m32.mean()) < 0.01


def grbm(V, H, learned_sigma, seed=0):
    r = np.random.default_rng(seed)
    p = {"W": jnp.asarray(r.normal(0, 0.5, (V, H)), jnp.float32), "b": jnp.asarray(r.normal(0, 0.3, V), jnp.float32),
         "c": jnp.asarray(r.normal(0, 0.5, H), jnp.float32)}
    if learned_sigma:
        p["log_sigma"] = jnp.asarray(r.normal(0, 0.2, V), jnp.float32)
    return p


def np_grbm(p):
    W, b, c = np_params(p)
    s2 = np.exp(2 * np.asarray(p["log_sigma"], np.float64)) if "log_sigma" in p else np.ones_like(b)
    return W, b, c, s2


@pytest.mark.parametrize("learned_sigma", [False, True])
def test_grbm_free_energy_vs_enumeration_and_quadrature(learned_sigma):
    p = grbm(2, 3, learned_sigma)
    W, b, c, s2 = np_grbm(p)
    hs = np_states(3)
    v = np.random.default_rng(1).normal(size=(5, 2))
    # -log sum_h exp(-E(v, h)), E written out independently
    neg_e = -((v - b) ** 2 / (2 * s2)).sum(1)[:, None] + (hs @ c)[None] + (v / s2) @ W @ hs.T
    np.testing.assert_allclose(np.asarray(gibbs.grbm_free_energy(p, jnp.asarray(v, jnp.float32))),
                               -np_logsumexp(neg_e, axis=1), rtol=1e-5)
    e = gibbs.grbm_energy(p, jnp.asarray(v[:3], jnp.float32), jnp.asarray(hs[[1, 4, 7]], jnp.float32))
    np.testing.assert_allclose(np.asarray(e), -neg_e[np.arange(3), [1, 4, 7]], rtol=1e-5)
    # Z = int exp(-F(v)) dv on a grid equals the Gaussian closed form summed over h
    g = np.linspace(-9, 9, 721)
    grid = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    f = np.asarray(gibbs.grbm_free_energy(p, jnp.asarray(grid, jnp.float32)), np.float64)
    z_quad = np.exp(-f).sum() * (g[1] - g[0]) ** 2
    m = b + hs @ W.T  # [2^H, V] means of p(v | h)
    z_closed = (np.exp(hs @ c + ((m ** 2 - b ** 2) / (2 * s2)).sum(1)) * np.prod(np.sqrt(2 * np.pi * s2))).sum()
    np.testing.assert_allclose(z_quad, z_closed, rtol=1e-4)


@pytest.mark.parametrize("learned_sigma", [False, True])
def test_grbm_conditionals(learned_sigma):
    p = grbm(3, 4, learned_sigma, seed=2)
    W, b, c, s2 = np_grbm(p)
    h = np.array([[1, 0, 1, 1]], np.float64)
    hb = jnp.broadcast_to(jnp.asarray(h, jnp.float32), (200000, 4))
    vs = np.asarray(gibbs.grbm_sample_v(jax.random.PRNGKey(0), p, hb))
    np.testing.assert_allclose(vs.mean(0), (b + h @ W.T)[0], atol=0.01)
    np.testing.assert_allclose(vs.var(0), s2, rtol=0.02)
    v = np.random.default_rng(3).normal(size=(4, 3))
    np.testing.assert_allclose(np.asarray(gibbs.grbm_hidden_probs(p, jnp.asarray(v, jnp.float32))),
                               1 / (1 + np.exp(-(c + (v / s2) @ W))), rtol=1e-5)
    out = gibbs.grbm_run_chain(jax.random.PRNGKey(1), p, jnp.zeros((16, 3)), 5)
    assert out.shape == (16, 3) and np.isfinite(np.asarray(out)).all()
    loss, v_k = gibbs.grbm_cd_loss(p, jax.random.PRNGKey(2), jnp.asarray(v, jnp.float32), k=2)
    assert np.isfinite(float(loss)) and v_k.shape == (4, 3)


def test_bad_shapes_and_args():
    p = rbm(5, 4)
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=r"\(2, 6\).*\(5, 4\)"):
        gibbs.free_energy(p, jnp.zeros((2, 6)))
    with pytest.raises(ValueError, match=r"W \[V, H\]"):
        gibbs.free_energy(dict(p, b=jnp.zeros(3)), jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="hidden units"):
        gibbs.visible_probs(p, jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="visible units"):
        gibbs.run_chain(key, p, jnp.zeros((2, 4)), 3)
    with pytest.raises(ValueError, match="k >= 1"):
        gibbs.cd_loss(p, key, jnp.zeros((2, 5)), k=0)
    with pytest.raises(ValueError, match="visible units"):
        gibbs.cd_loss(p, key, jnp.zeros((2, 5)), v_chain=jnp.zeros((3, 7)))
    with pytest.raises(ValueError, match="num_steps"):
        gibbs.run_chain(key, p, jnp.zeros((2, 5)), 0)
    with pytest.raises(ValueError, match="log_sigma"):
        gibbs.grbm_free_energy(dict(p, log_sigma=jnp.zeros(4)), jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="not both"):
        gibbs.ais_log_partition(key, p, 4, 4, base_visible_bias=jnp.zeros(5), data_mean=jnp.zeros(5))


# ------------------------------------------------------------------------------------ native (C++)

from zoo.ops import native  # noqa: E402


def _methods():
    """The kernel's GEMMs this machine runs: float32 FMA always, AMX bf16x3 where there is AMX."""
    if not native.available():
        return []
    v0 = jnp.zeros((1, 3))
    try:
        gibbs._native_chain(jax.random.PRNGKey(0), rbm(3, 2), v0, 1, False, method="amx").block_until_ready()
        return ["fma", "amx"]
    except Exception:  # noqa: BLE001 -- no AMX on this CPU / OS / build
        return ["fma"]


METHODS = _methods()


@pytest.fixture(params=METHODS or [pytest.param("none", marks=pytest.mark.skip(reason="no native kernels"))])
def method(request):
    return request.param


def _binary(B, V, seed=1, p=0.5):
    return jnp.asarray((np.random.default_rng(seed).random((B, V)) < p).astype(np.float32))


def _same_rows(a, b):
    return float(np.mean(np.all(np.asarray(a) == np.asarray(b), axis=-1)))


@pytest.mark.parametrize("V, H, B, K, rows", [(784, 500, 70, 4, 32), (13, 7, 33, 5, 8), (64, 256, 300, 3, 128),
                                              (1, 1, 3, 2, 1), (5, 0, 7, 2, 4)])
def test_native_chain_equals_the_xla_chain(method, V, H, B, K, rows):
    """Same key, same uniforms: the C++ chain is the XLA chain, unit for unit (up to a
    comparison float32 rounding decides differently, ~1e-7 per unit: whole rows must agree).
    V, H not multiples of the vectors or tiles; B not of the tasks (block_rows) or AMX's 32 rows;
    no hidden units at all (the visible units sample from their biases)."""
    p = rbm(V, H, 0.05 if V > 100 else 0.8, seed=3)
    v0, key = _binary(B, V), jax.random.PRNGKey(4)
    want_v, want_hist = gibbs.run_chain(key, p, v0, K, keep_history=True, implementation="xla")
    got_v, got_hist = jax.jit(lambda p, v: gibbs._native_chain(key, p, v, K, True, method=method, block_rows=rows))(p, v0)
    assert got_hist.shape == (K, B, V) and got_hist.dtype == jnp.float32
    assert set(np.unique(np.asarray(got_hist))) <= {0.0, 1.0}
    assert _same_rows(got_hist, want_hist) >= 0.98
    np.testing.assert_array_equal(got_v, got_hist[-1])
    last = jax.jit(lambda p, v: gibbs._native_chain(key, p, v, K, False, method=method, block_rows=rows))(p, v0)
    np.testing.assert_array_equal(last, got_v)


def test_native_chain_from_probabilities_nans_and_bf16_states(method):
    """A start state that is not 0 / 1 (AMX: its first product in float32 FMA), a NaN weight
    (its hidden unit's probability is NaN: never on, as in XLA), bf16 state in, bf16 out."""
    p = rbm(40, 20, 0.5, seed=6)
    key = jax.random.PRNGKey(1)
    v0 = jnp.asarray(np.random.default_rng(2).random((50, 40)), jnp.float32)
    want = gibbs.run_chain(key, p, v0, 3, implementation="xla")
    assert _same_rows(gibbs._native_chain(key, p, v0, 3, False, method=method), want) >= 0.98
    p_nan = dict(p, W=p["W"].at[5, 7].set(jnp.nan))
    v1 = _binary(50, 40)
    got_h = gibbs._native_chain(key, p_nan, v1, 1, False, method=method)
    np.testing.assert_array_equal(got_h, gibbs.run_chain(key, p_nan, v1, 1, implementation="xla"))
    out = gibbs.run_chain(key, p, v1.astype(jnp.bfloat16), 2, implementation="native")
    assert out.dtype == jnp.bfloat16
    assert _same_rows(out, gibbs.run_chain(key, p, v1, 2, implementation="xla")) >= 0.98


def test_native_chain_long_run_matches_exact_distribution(method):
    p = rbm(4, 3, 1.0, seed=11)
    hist = gibbs._native_chain(jax.random.PRNGKey(0), p, jnp.zeros((4000, 4)), 60, True, method=method)[1]
    codes = (np.asarray(hist[20:]).reshape(-1, 4) * (2 ** np.arange(3, -1, -1))).sum(1).astype(int)
    emp = np.bincount(codes, minlength=16) / len(codes)
    assert 0.5 * np.abs(emp - np_p_v(p)).sum() < 0.03


def test_native_chain_under_a_mesh_vmap_and_grad(method):
    """Chains sharded over 8 devices (each runs its own: the uniforms follow the global rows), a
    vmap over keys (folded into the kernel's chains), and CD-k's gradient through it."""
    if method != METHODS[-1]:
        pytest.skip("the auto method only")
    p = rbm(30, 20, 0.5, seed=7)
    v0, key = _binary(64, 30), jax.random.PRNGKey(2)
    want = gibbs.run_chain(key, p, v0, 4, implementation="xla")
    mesh = jax.make_mesh((8,), ("data",))
    sharded = jax.device_put(v0, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    f = jax.jit(lambda p, v: gibbs.run_chain(key, p, v, 4, implementation="native"))
    got = f(p, sharded)
    assert _same_rows(got, want) >= 0.98
    assert got.sharding.spec[0] == "data"
    assert "all-gather" not in f.lower(p, sharded).compile().as_text()
    keys = jax.random.split(key, 3)
    got = jax.vmap(lambda k: gibbs.run_chain(k, p, v0, 2, implementation="native"))(keys)
    want = jnp.stack([gibbs.run_chain(k, p, v0, 2, implementation="xla") for k in keys])
    assert _same_rows(got, want) >= 0.98
    loss = lambda impl: jax.grad(lambda q: gibbs.cd_loss(q, key, v0, k=2, implementation=impl)[0])(p)
    for g, r in zip(jax.tree.leaves(jax.jit(lambda: loss("native"))()), jax.tree.leaves(loss("xla"))):
        np.testing.assert_allclose(g, r, atol=0.05)  # the same samples but for a rare flipped unit


def test_native_chain_choice_and_errors():
    p, key, v0 = rbm(5, 4), jax.random.PRNGKey(0), jnp.zeros((2, 5))
    with pytest.raises(ValueError, match="unknown chain implementation 'fast'"):
        gibbs.run_chain(key, p, v0, 2, implementation="fast")
    with pytest.raises(ValueError, match="compute_dtype"):
        gibbs.run_chain(key, p, v0, 2, implementation="native", compute_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="uniforms"):
        gibbs.run_chain(key, p, v0, 2, implementation="native", uniforms="threefry")
    applies = gibbs._chain_implementation
    v_many = jnp.zeros((100, 5))
    assert applies(None, p, v_many, jnp.bfloat16, "hash", 5) == "xla"
    assert applies(None, p, v_many, None, "threefry", 5) == "xla"
    assert applies(None, p, v_many, None, "hash", 4) == "xla"  # CD-1 .. CD-4: packing W costs more
    assert applies(None, p, v0, None, "hash", 200) == "xla"  # 2 chains x 200 sweeps: too few
    if native.available():
        assert applies(None, p, v_many, None, "hash", 5) == "native"
        assert applies("native", p, v0, None, "hash", 1) == "native"
        with pytest.raises(ValueError, match="method must be one of"):
            native.gibbs_chain(v0, jnp.zeros((2, 1, 2, 2), jnp.uint32), jnp.arange(2, dtype=jnp.uint32),
                               p["W"], p["b"], p["c"], method="avx")
        with pytest.raises(ValueError, match="block_rows"):
            gibbs._native_chain(key, p, v0, 1, False, block_rows=0)


def test_native_chain_falls_back_without_a_compiler(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "no C++ compiler found")
    p, key, v0 = rbm(5, 4), jax.random.PRNGKey(0), jnp.zeros((2, 5))
    assert gibbs._chain_implementation(None, p, jnp.zeros((100, 5)), None, "hash", 5) == "xla"
    with pytest.raises(native.NativeUnavailable, match="no C\\+\\+ compiler"):
        gibbs.run_chain(key, p, v0, 2, implementation="native")
