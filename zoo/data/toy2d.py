"""Toy 2-D point sets with known densities: `moons`, `gaussians8`, `swissroll`.

Each is a noise-convolved distribution, sampled with a fixed seed (20,000 train, 5,000 test, from
different seeds), and `log_density(name, x_Nx2)` gives its log density:

- gaussians8: an equal mixture of 8 isotropic Gaussians (std 0.2) centred on the circle of
  radius 2 at angles 2*pi*k/8. Exact closed form.
- moons: scikit-learn's two half circles, t ~ U[0, pi], outer (cos t, sin t) and inner
  (1 - cos t, 0.5 - sin t), each with prob. 1/2, plus N(0, 0.1^2 I) noise.
- swissroll: t ~ U[1.5 pi, 4.5 pi], point (t cos t, t sin t) / 5, plus N(0, 0.1^2 I) noise.

For the curves, p(x) = E_t N(x; c(t), s^2 I), an integral over the curve parameter computed with
the midpoint rule on `nodes` points (default 2048: node spacing along the curve is < 0.01, a
tenth of the noise std, so the quadrature error is far below anything a model resolves).

Glossary: N points, K quadrature nodes (or mixture components).
"""

from __future__ import annotations

import numpy as np

from zoo.errors import DataError, unknown

NAMES = ("moons", "gaussians8", "swissroll")
SIZES = {"train": 20_000, "test": 5_000}
_SEEDS = {"train": 0, "test": 1}
_G8_RADIUS, _G8_STD = 2.0, 0.2
_CURVE_STD = 0.1


def _check(name: str) -> None:
    if name not in NAMES:
        raise DataError(unknown("toy2d set", name, NAMES))


def _curve(name: str, t_K: np.ndarray, branch_K: np.ndarray | None = None) -> np.ndarray:
    """Noise-free curve points c(t) [K, 2]; `branch` picks the moon (0 outer, 1 inner)."""
    if name == "moons":
        outer = np.stack([np.cos(t_K), np.sin(t_K)], -1)
        inner = np.stack([1.0 - np.cos(t_K), 0.5 - np.sin(t_K)], -1)
        return np.where(branch_K[:, None] == 0, outer, inner)
    return np.stack([t_K * np.cos(t_K), t_K * np.sin(t_K)], -1) / 5.0


def _g8_centres() -> np.ndarray:
    ang = 2 * np.pi * np.arange(8) / 8
    return _G8_RADIUS * np.stack([np.cos(ang), np.sin(ang)], -1)


def sample(name: str, n: int, seed: int) -> np.ndarray:
    """`n` points [n, 2] float32 from set `name`, deterministic in `seed`."""
    _check(name)
    rng = np.random.default_rng([seed, NAMES.index(name)])
    if name == "gaussians8":
        mean = _g8_centres()[rng.integers(0, 8, n)]
        return (mean + _G8_STD * rng.standard_normal((n, 2))).astype(np.float32)
    if name == "moons":
        t, branch = rng.uniform(0, np.pi, n), rng.integers(0, 2, n)
    else:
        t, branch = rng.uniform(1.5 * np.pi, 4.5 * np.pi, n), None
    return (_curve(name, t, branch) + _CURVE_STD * rng.standard_normal((n, 2))).astype(np.float32)


def points(name: str, split: str) -> np.ndarray:
    """The fixed train or test set of `name`."""
    return sample(name, SIZES[split], _SEEDS[split])


def _logsumexp(a_NxK: np.ndarray) -> np.ndarray:
    m = a_NxK.max(-1, keepdims=True)
    return (m + np.log(np.exp(a_NxK - m).sum(-1, keepdims=True)))[:, 0]


def _mixture_logpdf(x_Nx2: np.ndarray, mu_Kx2: np.ndarray, std: float) -> np.ndarray:
    """log (1/K) sum_k N(x; mu_k, std^2 I), chunked over N to bound memory."""
    out = np.empty(len(x_Nx2))
    for s in range(0, len(x_Nx2), 4096):
        x = x_Nx2[s : s + 4096]
        d2_NxK = ((x[:, None, :] - mu_Kx2[None]) ** 2).sum(-1)
        logn = -0.5 * d2_NxK / std**2 - np.log(2 * np.pi * std**2)
        out[s : s + 4096] = _logsumexp(logn) - np.log(len(mu_Kx2))
    return out


def log_density(name: str, x, *, nodes: int = 2048) -> np.ndarray:
    """log p(x) [N] (float64) for points x [N, 2] under set `name` (see module docstring)."""
    _check(name)
    x_Nx2 = np.asarray(x, np.float64).reshape(-1, 2)
    if name == "gaussians8":
        return _mixture_logpdf(x_Nx2, _g8_centres(), _G8_STD)
    if name == "moons":
        t = (np.arange(nodes) + 0.5) * np.pi / nodes
        mu = np.concatenate([_curve("moons", t, np.full(nodes, b)) for b in (0, 1)])
    else:
        t = 1.5 * np.pi + (np.arange(nodes) + 0.5) * 3 * np.pi / nodes
        mu = _curve("swissroll", t)
    return _mixture_logpdf(x_Nx2, mu, _CURVE_STD)
