"""Frechet distance between feature sets, and a small digits classifier that gives the features.

The Frechet distance between Gaussians fitted to two feature sets (Dowson & Landau 1982; used as
FID by Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule...", eq. 6):

    FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

S1 S2 is not symmetric, so rather than a general matrix square root we use that it is similar to
the symmetric PSD matrix sqrt(S1) S2 sqrt(S1): Tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i) over that
matrix's eigenvalues, all from symmetric `eigh` in float64 (no complex parts to discard).

Inception features mean nothing for 8x8 digits, so the zoo trains its own small classifier (an
MLP, ~99% test accuracy, ~1 s of CPU) once on the `digits` train split and caches it in
`cache_dir/fd_classifier.npz` (`load_or_train_classifier`). `digits_fd_floor` is the FD of the
held-out test digits to the train digits: what a perfect sampler would score with the same sample
count. FD is biased upward at small N (Chong & Forsyth 2020, "Effectively Unbiased FID and
Inception Score"), so compare samples to the floor at the test split's N (360).

Shape letters: N, M examples; F feature width; H, W image height and width (8); C channels (1);
B batch; D hidden width; S steps per epoch; K classes (10).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from zoo.errors import ConfigError, DataError, unknown
from zoo.ops import losses

CACHE_FILE = "fd_classifier.npz"
ARCH_VERSION = 1  # bump when `DigitsMLP` changes, so older caches are retrained, not misread
EPOCHS = 40
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4
FEATURE_BATCH = 256
FEATURES = 128
RANGE_TOLERANCE = 1e-4  # float round-off of decoders that end in a sigmoid or a rescale
REFERENCES = ("train", "test")


# ---------------------------------------------------------------------------------- the distance


def _check_stats(mu: np.ndarray, cov: np.ndarray, which: str) -> None:
    f = mu.shape[0] if mu.ndim == 1 else None
    if f is None or cov.shape != (f, f):
        raise DataError(f"stats {which}: need mu [F] and cov [F, F]; got {mu.shape}, {cov.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(cov))):
        raise DataError(f"stats {which}: mu and cov must be finite")


def frechet_distance_from_stats(mu1, cov1, mu2, cov2) -> float:
    """FD between N(mu1, cov1) and N(mu2, cov2) (Heusel et al. 2017, eq. 6), in float64."""
    mu1, cov1, mu2, cov2 = (np.asarray(a, np.float64) for a in (mu1, cov1, mu2, cov2))
    _check_stats(mu1, cov1, "1")
    _check_stats(mu2, cov2, "2")
    if mu1.shape != mu2.shape:
        raise DataError(f"feature widths differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    # symmetrise first: a sample covariance can be off-symmetric by round-off, which eigh ignores
    w1, v1 = np.linalg.eigh((cov1 + cov1.T) / 2)
    sqrt1 = (v1 * np.sqrt(np.clip(w1, 0.0, None))) @ v1.T
    inner = sqrt1 @ ((cov2 + cov2.T) / 2) @ sqrt1
    # a PSD matrix's tiny negative eigenvalues are round-off: clip them, do not take sqrt of them
    tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)))
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt
    return float(max(fd, 0.0))  # FD >= 0; a value of -1e-12 is cancellation, not information


def feature_stats(feats_NxF) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and unbiased covariance [F, F] (ddof=1, as in the reference FID code), float64."""
    feats_NxF = np.asarray(feats_NxF, np.float64)
    if feats_NxF.ndim != 2:
        raise DataError(f"features must be [N, F]; got shape {feats_NxF.shape}")
    if feats_NxF.shape[0] < 2:
        raise DataError(f"need at least 2 feature rows for a covariance; got {feats_NxF.shape[0]}")
    if not np.all(np.isfinite(feats_NxF)):
        raise DataError("features contain NaN or inf")
    return feats_NxF.mean(axis=0), np.cov(feats_NxF, rowvar=False, ddof=1).reshape(
        feats_NxF.shape[1], feats_NxF.shape[1])


def frechet_distance(feats_a_NxF, feats_b_MxF) -> float:
    """FD between Gaussians fitted to two feature sets (rows are examples)."""
    a, b = np.asarray(feats_a_NxF), np.asarray(feats_b_MxF)
    if a.ndim == 2 and b.ndim == 2 and a.shape[1] != b.shape[1]:
        raise DataError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance_from_stats(*feature_stats(a), *feature_stats(b))


# ---------------------------------------------------------------------------- the feature network


class DigitsMLP(nn.Module):
    """dense(256) -> dense(128) [features] -> dense(10) [logits], ReLU between.

    An MLP rather than a CNN: on CPU, XLA's convolutions made a conv(32)-conv(64) net ~100x
    slower to train (140 s vs 1 s) for the same 99.4% test accuracy on 8x8 digits.
    """

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
        h_BxD = nn.relu(nn.Dense(256, name="dense_0")(x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)))
        feats_BxF = nn.relu(nn.Dense(FEATURES, name="dense_1")(h_BxD))
        return feats_BxF, nn.Dense(10, name="dense_2")(feats_BxF)


_MODEL = DigitsMLP()


@jax.jit
def _apply(params, x_BxHxWxC):
    return _MODEL.apply({"params": params}, x_BxHxWxC)


def check_digit_images(x, what: str = "images") -> np.ndarray:
    """`x` as float32 [N, 8, 8, 1], or a DataError: wrong shape, NaN/inf, values outside [0, 1]."""
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[1:] != (8, 8, 1):
        raise DataError(f"{what} must be digits images [N, 8, 8, 1]; got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{what} must be real numbers in [0, 1]; got dtype {x.dtype}")
    x = x.astype(np.float32)
    if x.size and not np.all(np.isfinite(x)):
        raise DataError(f"{what} contain NaN or inf")
    if x.size and (x.min() < -RANGE_TOLERANCE or x.max() > 1 + RANGE_TOLERANCE):
        raise DataError(f"{what} must lie in [0, 1] (clip them first, e.g. np.clip(x, 0, 1)); "
                        f"got values in [{x.min():.4g}, {x.max():.4g}]")
    return x


@dataclasses.dataclass(frozen=True)
class DigitsFeatures:
    """A trained `DigitsMLP`: `features(x)` [N, 128] (the ReLU layer before the logits), `logits`.

    `meta` is the cache record (settings, train-split fingerprint, test accuracy); `trained` says
    whether this object was trained now (True) or loaded from the cache (False).
    """

    params: dict
    meta: dict
    trained: bool = False

    @property
    def accuracy(self) -> float:
        """Test-split accuracy, measured when the network was trained."""
        return float(self.meta["test_accuracy"])

    def _run(self, x, which: int) -> np.ndarray:
        x = check_digit_images(x)
        n = len(x)
        # pad to whole batches: one compiled shape for every N
        pad = (-n) % FEATURE_BATCH
        x = np.concatenate([x, np.zeros((pad, 8, 8, 1), np.float32)]) if pad else x
        outs = [np.asarray(_apply(self.params, x[i:i + FEATURE_BATCH])[which])
                for i in range(0, len(x), FEATURE_BATCH)]
        width = FEATURES if which == 0 else 10
        return np.concatenate(outs)[:n] if outs else np.zeros((0, width), np.float32)

    def features(self, x_Nx8x8x1) -> np.ndarray:
        """Feature vectors [N, 128] of images in [0, 1]."""
        return self._run(x_Nx8x8x1, 0)

    def logits(self, x_Nx8x8x1) -> np.ndarray:
        """Class logits [N, 10] of images in [0, 1]."""
        return self._run(x_Nx8x8x1, 1)


# ------------------------------------------------------------------------- training and the cache


def _split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The zoo's own `digits` split (so the FD reference is the models' train/test): x, labels."""
    from zoo.data import load

    arrays = load("digits", split).arrays
    return arrays["x"], arrays["label"]


def _fingerprint(x: np.ndarray, labels: np.ndarray) -> str:
    """A hash of the train split: a cache trained on other data (a changed split) is not reused."""
    h = hashlib.sha256(np.ascontiguousarray(x, np.float32).tobytes())
    h.update(np.ascontiguousarray(labels, np.int32).tobytes())
    return h.hexdigest()[:16]


def _loss(params, x_BxHxWxC, y_B):
    _, logits_BxK = _MODEL.apply({"params": params}, x_BxHxWxC)
    return losses.cross_entropy(logits_BxK, y_B).mean()


# AdamW with the learning rate applied by hand: the cosine schedule's length is then a traced
# argument, so one compiled epoch serves every `epochs` (tests train short, the cache trains long)
_TX = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(WEIGHT_DECAY))


@jax.jit
def _train_epoch(params, opt_state, x_SxBxHxWxC, y_SxB, step0, total_steps):
    """One epoch of AdamW steps in lax.scan (one dispatch per epoch) -> params, state, mean loss."""

    def step(carry, batch):
        params, opt_state, i = carry
        loss, grads = jax.value_and_grad(_loss)(params, *batch)
        updates, opt_state = _TX.update(grads, opt_state, params)
        lr = LEARNING_RATE * 0.5 * (1 + jnp.cos(jnp.pi * i / total_steps))  # cosine decay to 0
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        return (params, opt_state, i + 1), loss

    (params, opt_state, _), losses = jax.lax.scan(
        step, (params, opt_state, jnp.asarray(step0, jnp.float32)), (x_SxBxHxWxC, y_SxB))
    return params, opt_state, losses.mean()


@jax.jit
def _init(key):
    """Params and AdamW state; jitted, as eager init compiles each small op alone (~10 s on CPU)."""
    params = _MODEL.init(key, jnp.zeros((1, 8, 8, 1), jnp.float32))["params"]
    return params, _TX.init(params)


def train_classifier(x_NxHxWxC: np.ndarray, labels_N: np.ndarray, *, seed: int = 0,
                     epochs: int = EPOCHS) -> dict:
    """Params of a `DigitsMLP` trained by AdamW with cosine decay; deterministic given `seed`."""
    n_steps = len(x_NxHxWxC) // BATCH_SIZE  # drop the ragged last batch: one compiled shape
    params, opt_state = _init(jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    total = float(epochs * n_steps)
    for e in range(epochs):
        order = rng.permutation(len(x_NxHxWxC))[: n_steps * BATCH_SIZE].reshape(n_steps, BATCH_SIZE)
        params, opt_state, loss = _train_epoch(params, opt_state, x_NxHxWxC[order], labels_N[order],
                                               float(e * n_steps), total)
        if not np.isfinite(float(loss)):  # float() also syncs each epoch
            raise FloatingPointError(f"FD classifier loss is {float(loss)} in epoch {e}")
    return jax.device_get(params)


def _expected_shapes() -> dict[str, tuple[tuple[int, ...], str]]:
    abstract = jax.eval_shape(_MODEL.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    flat = traverse_util.flatten_dict(abstract, sep="/")
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in flat.items()}


def _read_cache(path: str, want: dict) -> tuple[DigitsFeatures | None, str]:
    """The cached network if `path` is readable and matches `want`; else None and the reason."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            flat = {k[len("param/"):]: z[k] for k in z.files if k.startswith("param/")}
    except Exception as e:  # zipfile, pickle, JSON and key errors all mean "unreadable"
        first_line = str(e).splitlines()[0][:120] if str(e) else ""
        return None, f"is unreadable ({type(e).__name__}: {first_line})"
    if not isinstance(meta, dict):
        return None, "has no metadata record"
    stale = [k for k in want if meta.get(k) != want[k]]
    if stale:
        diffs = ", ".join(f"{k}={meta.get(k)!r} (want {want[k]!r})" for k in stale)
        return None, f"was made with other settings: {diffs}"
    shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in flat.items()}
    if shapes != _expected_shapes() or not isinstance(meta.get("test_accuracy"), float):
        return None, "does not hold this architecture's parameters"
    return DigitsFeatures(traverse_util.unflatten_dict(flat, sep="/"), meta, trained=False), ""


def _write_cache(path: str, params: dict, meta: dict) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    flat = traverse_util.flatten_dict(params, sep="/")
    arrays = {f"param/{k}": np.asarray(v) for k, v in flat.items()}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".fd_classifier.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_or_train_classifier(cache_dir: str, *, seed: int = 0,
                             epochs: int = EPOCHS) -> DigitsFeatures:
    """The FD feature network cached in `cache_dir/fd_classifier.npz`; trained (~seconds) if absent.

    A cache that is unreadable or was made with other settings (architecture version, seed,
    epochs, batch size, learning rate, weight decay, train split) is retrained and replaced, with
    a warning on stderr.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int; got {seed!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an int >= 1; got {epochs!r}")
    x, labels = _split("train")
    want = {"arch": ARCH_VERSION, "seed": seed, "epochs": epochs, "batch_size": BATCH_SIZE,
            "learning_rate": LEARNING_RATE, "weight_decay": WEIGHT_DECAY,
            "train_fingerprint": _fingerprint(x, labels)}
    path = os.path.join(cache_dir, CACHE_FILE)
    if os.path.exists(path):
        net, why = _read_cache(path, want)
        if net is not None:
            return net
        print(f"warning: FD classifier cache {path} {why}; retraining it", file=sys.stderr)
    try:  # before training, so a bad folder fails in a moment rather than after the training
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the FD classifier cache folder {cache_dir}: {e}") from e
    start = time.perf_counter()
    params = train_classifier(x, labels, seed=seed, epochs=epochs)
    seconds = time.perf_counter() - start
    x_test, labels_test = _split("test")
    net = DigitsFeatures(params, dict(want, test_accuracy=0.0), trained=True)
    accuracy = float(np.mean(np.argmax(net.logits(x_test), axis=-1) == labels_test))
    meta = dict(want, test_accuracy=accuracy, train_seconds=round(seconds, 2))
    try:
        _write_cache(path, params, meta)
    except OSError as e:
        raise ConfigError(f"cannot write the FD classifier cache {path}: {e}") from e
    return DigitsFeatures(params, meta, trained=True)


# ------------------------------------------------------------------------------ FD on the digits


def digits_fd(samples_Nx8x8x1, cache_dir: str, *, reference: str = "train", seed: int = 0,
              epochs: int = EPOCHS) -> float:
    """FD between samples' features and the `reference` digits split's ("train" | "test").

    Samples must be [N, 8, 8, 1] in [0, 1] (the `digits` source's scale); clipping a sampler's
    output into [0, 1] is the caller's job, so an unclipped or wrongly scaled batch is an error
    rather than a silently distorted number. Compare against `digits_fd_floor` at the same N.
    """
    if reference not in REFERENCES:
        raise ConfigError(unknown("reference split", reference, REFERENCES))
    samples = check_digit_images(samples_Nx8x8x1, "samples")
    if len(samples) < 2:
        raise DataError(f"need at least 2 samples for a Frechet distance; got {len(samples)}")
    net = load_or_train_classifier(cache_dir, seed=seed, epochs=epochs)
    return frechet_distance(net.features(samples), net.features(_split(reference)[0]))


def digits_fd_floor(cache_dir: str, *, seed: int = 0, epochs: int = EPOCHS) -> float:
    """FD of the held-out test digits (360) to the train digits: what a perfect sampler scores."""
    return digits_fd(_split("test")[0], cache_dir, reference="train", seed=seed, epochs=epochs)
