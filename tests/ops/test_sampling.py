"""zoo.ops.sampling against NumPy filters and against softmax probabilities (Monte Carlo)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import sampling

N_DRAWS = 20_000  # frequency std <= 0.0036: a 0.015 tolerance is > 4 sigma


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_order(row):
    return np.argsort(-row, kind="stable")  # descending, ties by lower index


def _np_top_k_keep(logits, k):
    keep = np.zeros(logits.shape, bool)
    for b, row in enumerate(logits):
        keep[b, _np_order(row)[:k]] = True
    return keep


def _np_top_p_keep(logits, p):
    keep = np.zeros(logits.shape, bool)
    for b, row in enumerate(logits.astype(np.float64)):
        order = _np_order(row)
        mass = np.cumsum(_np_softmax(row)[order])
        n = int(np.argmax(mass >= p)) + 1 if p < 1 else len(row)  # smallest prefix with mass >= p
        keep[b, order[:n]] = True
    return keep


def _ties_logits():
    rng = np.random.default_rng(0)
    return rng.integers(-3, 4, size=(6, 10)).astype(np.float32)  # many ties


def test_greedy_is_argmax_with_lowest_index_on_ties():
    logits = _ties_logits()
    got = sampling.greedy(jnp.asarray(logits))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, np.argmax(logits, -1))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_keeps_exactly_the_k_largest(k):
    logits = _ties_logits()
    got = np.asarray(sampling.top_k_filter(jnp.asarray(logits), k))
    keep = _np_top_k_keep(logits, k)
    assert (np.isfinite(got).sum(-1) == k).all()
    np.testing.assert_array_equal(np.isfinite(got), keep)
    np.testing.assert_array_equal(got[keep], logits[keep])


@pytest.mark.parametrize("p", [1e-4, 0.3, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_top_p_keeps_smallest_prefix_reaching_p(p, ties):
    logits = _ties_logits() if ties else np.random.default_rng(1).normal(size=(8, 12)).astype(np.float32) * 2
    got = np.asarray(sampling.top_p_filter(jnp.asarray(logits), p))
    keep = _np_top_p_keep(logits, p)
    np.testing.assert_array_equal(np.isfinite(got), keep)
    np.testing.assert_array_equal(got[keep], logits[keep])
    assert (keep.sum(-1) >= 1).all()


def test_top_p_breaks_ties_by_index():
    logits = jnp.log(jnp.array([[0.1, 0.3, 0.3, 0.3]]))  # two of the three 0.3s reach p = 0.5
    got = sampling.top_p_filter(logits, 0.5)
    np.testing.assert_array_equal(np.isfinite(got), [[False, True, True, False]])


def _frequencies(draws, V):
    return np.bincount(np.asarray(draws), minlength=V) / draws.shape[0]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_frequencies_match_softmax(temperature):
    logits = np.array([1.0, 0.0, -1.0, 2.0, 0.5], np.float32)
    batch = jnp.broadcast_to(jnp.asarray(logits), (N_DRAWS, logits.size))  # independent rows
    draws = jax.jit(sampling.sample_temperature)(jax.random.key(0), batch, temperature)
    assert draws.shape == (N_DRAWS,) and draws.dtype == jnp.int32
    np.testing.assert_allclose(_frequencies(draws, 5), _np_softmax(logits / temperature), atol=0.015)


def test_sample_logits_with_filters_matches_renormalised_softmax():
    logits = np.array([1.0, 0.0, -1.0, 2.0, 0.5, 1.5], np.float32)
    batch = jnp.broadcast_to(jnp.asarray(logits), (N_DRAWS, logits.size))
    for kw, kept in [(dict(top_k=3), [0, 3, 5]), (dict(top_p=0.6), [3, 5]),
                     (dict(top_k=3, top_p=0.95, temperature=0.7), [0, 3, 5])]:
        draws = sampling.sample_logits(jax.random.key(1), batch, **kw)
        t = kw.get("temperature", 1.0)
        want = np.zeros_like(logits)
        want[kept] = _np_softmax(logits[kept] / t)
        np.testing.assert_allclose(_frequencies(draws, logits.size), want, atol=0.015)


def test_temperature_zero_is_greedy():
    logits = jnp.asarray(_ties_logits())
    key = jax.random.key(2)
    want = sampling.greedy(logits)
    np.testing.assert_array_equal(sampling.sample_temperature(key, logits, 0.0), want)
    np.testing.assert_array_equal(sampling.sample_logits(key, logits, temperature=0, top_k=2), want)
    traced = jax.jit(sampling.sample_temperature)(key, logits, jnp.float32(0.0))  # array temperature
    np.testing.assert_array_equal(traced, want)


@pytest.mark.parametrize("call, match", [
    (lambda l: sampling.greedy(l[0]), r"\[B, V\].*\(10,\)"),
    (lambda l: sampling.top_k_filter(l, 0), "top_k"),
    (lambda l: sampling.top_k_filter(l, 11), r"V=10"),
    (lambda l: sampling.top_k_filter(l, 2.5), "top_k"),
    (lambda l: sampling.top_p_filter(l, 0.0), "top_p"),
    (lambda l: sampling.top_p_filter(l, 1.5), "top_p"),
    (lambda l: sampling.sample_temperature(jax.random.key(0), l, -1.0), "temperature"),
    (lambda l: sampling.sample_logits(jax.random.key(0), l, temperature=0, top_p=2.0), "top_p"),
    (lambda l: sampling.sample_logits(jax.random.key(0), l, temperature=float("nan")), "temperature"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(jnp.asarray(_ties_logits()))
