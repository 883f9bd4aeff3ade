"""Frechet distance against scipy's sqrtm and closed forms; the cached digits feature network."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import scipy.linalg

from zoo.errors import ConfigError, DataError
from zoo.eval import frechet
from zoo.eval.frechet import (
    CACHE_FILE,
    digits_fd,
    digits_fd_floor,
    frechet_distance,
    frechet_distance_from_stats,
    load_or_train_classifier,
)


def _spd(rng, f: int) -> np.ndarray:
    a = rng.normal(size=(f, f))
    return a @ a.T + 0.1 * np.eye(f)


def _fd_scipy(mu1, cov1, mu2, cov2) -> float:
    """The textbook formula with a general matrix square root of S1 S2 (Heusel et al. 2017)."""
    covmean = scipy.linalg.sqrtm(cov1 @ cov2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * covmean))


# ------------------------------------------------------------------------------------ the distance


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_from_stats_matches_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    cov1, cov2 = _spd(rng, 6), _spd(rng, 6)
    got = frechet_distance_from_stats(mu1, cov1, mu2, cov2)
    np.testing.assert_allclose(got, _fd_scipy(mu1, cov1, mu2, cov2), rtol=1e-8)


def test_symmetric():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(40, 5)), rng.normal(1.0, 2.0, size=(30, 5))
    np.testing.assert_allclose(frechet_distance(a, b), frechet_distance(b, a), rtol=1e-10)


@pytest.mark.parametrize("n,f", [(50, 5), (4, 10)])  # (4, 10): rank-deficient covariance
def test_set_with_itself_is_zero(n, f):
    feats = np.random.default_rng(4).normal(size=(n, f)) * 3.0
    assert abs(frechet_distance(feats, feats)) < 1e-8


def test_equal_covariance_gives_squared_mean_gap():
    rng = np.random.default_rng(5)
    mu1, mu2, cov = rng.normal(size=7), rng.normal(size=7), _spd(rng, 7)
    got = frechet_distance_from_stats(mu1, cov, mu2, cov)
    np.testing.assert_allclose(got, np.sum((mu1 - mu2) ** 2), rtol=1e-9)


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(6)
    a, b = rng.uniform(0.1, 3.0, size=8), rng.uniform(0.1, 3.0, size=8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b))
    np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize("a_shape,b_shape,match", [
    ((10, 3), (10, 4), "feature widths differ"),
    ((1, 3), (10, 3), "at least 2"),
    ((10,), (10, 3), r"\[N, F\]"),
])
def test_bad_features_are_data_errors(a_shape, b_shape, match):
    with pytest.raises(DataError, match=match):
        frechet_distance(np.ones(a_shape), np.ones(b_shape))


def test_bad_stats_are_data_errors():
    with pytest.raises(DataError, match="widths differ"):
        frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(DataError, match=r"cov \[F, F\]"):
        frechet_distance_from_stats(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))


# -------------------------------------------------------------------------------- the classifier


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The real (default-settings) network, trained once into a fresh cache folder."""
    cache_dir = str(tmp_path_factory.mktemp("fd_cache"))
    return cache_dir, load_or_train_classifier(cache_dir)


def test_trains_once_accurately_and_records_settings(cache):
    cache_dir, net = cache
    assert net.trained and os.path.isfile(os.path.join(cache_dir, CACHE_FILE))
    assert net.accuracy >= 0.95
    x_test, labels_test = frechet._split("test")
    assert np.mean(np.argmax(net.logits(x_test), -1) == labels_test) == pytest.approx(net.accuracy)
    assert net.meta["epochs"] == frechet.EPOCHS and net.meta["seed"] == 0
    assert net.features(x_test[:5]).shape == (5, frechet.FEATURES)


def test_second_call_loads_without_retraining(cache):
    cache_dir, net = cache
    path = os.path.join(cache_dir, CACHE_FILE)
    mtime = os.stat(path).st_mtime_ns
    again = load_or_train_classifier(cache_dir)
    assert not again.trained and os.stat(path).st_mtime_ns == mtime
    x = frechet._split("test")[0]
    np.testing.assert_array_equal(again.features(x), net.features(x))
    assert again.accuracy == net.accuracy


def test_same_seed_trains_identical_weights(tmp_path):
    a = load_or_train_classifier(str(tmp_path / "a"), epochs=2)
    b = load_or_train_classifier(str(tmp_path / "b"), epochs=2)
    x = frechet._split("test")[0]
    np.testing.assert_array_equal(a.features(x), b.features(x))


def _garbage(path):
    with open(path, "wb") as f:
        f.write(b"not a zip file")


def _truncated(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _wrong_shapes(path):
    net = load_or_train_classifier(os.path.dirname(path), epochs=2)
    params = dict(net.params, dense_2={"kernel": np.zeros((128, 7)), "bias": np.zeros(7)})
    frechet._write_cache(path, params, net.meta)


@pytest.mark.parametrize("damage,why", [(_garbage, "unreadable"), (_truncated, "unreadable"),
                                        (_wrong_shapes, "architecture")])
def test_corrupt_cache_is_retrained_with_a_warning(tmp_path, capsys, damage, why):
    path = os.path.join(tmp_path, CACHE_FILE)
    load_or_train_classifier(str(tmp_path), epochs=2)
    damage(path)
    capsys.readouterr()
    net = load_or_train_classifier(str(tmp_path), epochs=2)
    err = capsys.readouterr().err
    assert net.trained and "warning" in err and why in err
    assert not load_or_train_classifier(str(tmp_path), epochs=2).trained  # the rewrite is readable


def test_cache_with_other_settings_is_not_reused(cache, tmp_path, capsys):
    shutil.copy(os.path.join(cache[0], CACHE_FILE), tmp_path / CACHE_FILE)
    net = load_or_train_classifier(str(tmp_path), epochs=2)
    assert net.trained and net.meta["epochs"] == 2
    assert f"epochs={frechet.EPOCHS}" in capsys.readouterr().err


# ------------------------------------------------------------------------------ FD on the digits


def test_digits_fd_train_vs_train_zero_floor_small_noise_large(cache):
    cache_dir, _ = cache
    x_train = frechet._split("train")[0]
    assert digits_fd(x_train, cache_dir) < 1e-6
    floor = digits_fd_floor(cache_dir)
    noise = np.random.default_rng(0).uniform(size=(360, 8, 8, 1))
    assert 0 < floor < 0.1 * digits_fd(noise, cache_dir)


@pytest.mark.parametrize("x,match", [
    (np.zeros((4, 8, 8)), r"\[N, 8, 8, 1\]"),
    (np.full((4, 8, 8, 1), 16.0), r"\[0, 1\]"),
    (np.full((4, 8, 8, 1), np.nan), "NaN"),
    (np.zeros((1, 8, 8, 1)), "at least 2"),
])
def test_digits_fd_rejects_bad_samples(cache, x, match):
    with pytest.raises(DataError, match=match):
        digits_fd(x, cache[0])


def test_digits_fd_rejects_unknown_reference(cache):
    with pytest.raises(ConfigError, match="valid: test, train"):
        digits_fd(np.zeros((4, 8, 8, 1)), cache[0], reference="val")
