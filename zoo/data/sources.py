"""The data sources by name (`SOURCES`) and `load(spec, split)`; a spec is `name` or `name:arg`.

Fixed splits, so a test set never leaks into training whatever the seed:
- digits, digits_binary: scikit-learn's 1,797 bundled 8x8 digits, ordered by
  `default_rng(0).permutation(1797)`; the last 360 are test (1,437 train / 360 test).
- toy2d:NAME: separate fixed-seed draws (see `zoo.data.toy2d`).
- pydocs: ~1 document in 20 by a stable hash (see `zoo.data.pydocs`).
- dates: ~10% of the dates 1950-2049 by a stable hash (see `zoo.data.dates`).
- text:PATH: the last 5% of the file's bytes are test.
- npz:PATH: `x_test`/`label_test` when present, else the last 10% of the rows of `x`/`label`.
- tfds:NAME: the dataset's own "train"/"test" splits.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from typing import Any, Callable

import numpy as np

from zoo.data import dates, pydocs, toy2d
from zoo.data.source import ArraySource, Source, WindowSource, check_split
from zoo.errors import DataError, unknown

DIGITS_TEST = 360
TEXT_TEST_FRACTION = 0.05
NPZ_TEST_FRACTION = 0.10


def _no_arg(name: str, arg: str | None, options: dict) -> None:
    if arg is not None:
        raise DataError(f"data source {name!r} takes no ':ARG' (got {name}:{arg})")
    if options:
        raise DataError(f"data source {name!r} takes no options; got {', '.join(sorted(options))}")


def _need_arg(name: str, arg: str | None, what: str) -> str:
    if not arg:
        raise DataError(f"data source {name!r} needs an argument: {name}:{what}")
    return arg


@functools.lru_cache(maxsize=None)
def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw digit images (values 0..16) [N, 8, 8] and labels [N] of `split`."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    order = order[: -DIGITS_TEST] if split == "train" else order[-DIGITS_TEST:]
    return d.images[order], d.target[order]


def _digits(spec, arg, split, seq_len, *, binary: bool = False, **options) -> Source:
    _no_arg(spec.split(":")[0], arg, options)
    images, labels = _digits_split(split)
    x = images[..., None] / 16.0
    x = (x > 0.5) if binary else x
    arrays = {"x": x.astype(np.float32), "label": labels.astype(np.int32)}
    return ArraySource(arrays, {"kind": "image", "num_classes": 10, "name": spec})


def _toy2d(spec, arg, split, seq_len, **options) -> Source:
    _no_arg("toy2d", None, options)
    name = _need_arg("toy2d", arg, "|".join(toy2d.NAMES))
    return ArraySource({"x": toy2d.points(name, split)}, {"kind": "points", "name": spec})


def _pydocs(spec, arg, split, seq_len, **options) -> Source:
    _no_arg("pydocs", None, options)
    if arg not in (None, "heldout"):
        raise DataError(f"unknown pydocs subset {arg!r}: use pydocs (the corpus) or pydocs:heldout "
                        "(the held-out documents, halved into a fine-tuning train/test)")
    return WindowSource(pydocs.pydocs_bytes(split, arg or "all"), seq_len, {"name": spec})


def _dates(spec, arg, split, seq_len, **options) -> Source:
    _no_arg("dates", arg, options)
    x, y = dates.arrays(split)
    return ArraySource({"x": x, "y": y}, dates.info(spec))


def _read(path: str, mode: str = "rb"):
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    return open(path, mode)


def _text(spec, arg, split, seq_len, **options) -> Source:
    _no_arg("text", None, options)
    with _read(_need_arg("text", arg, "PATH")) as f:
        data = np.frombuffer(f.read(), np.uint8)
    cut = int(len(data) * (1 - TEXT_TEST_FRACTION))
    part = data[:cut] if split == "train" else data[cut:]
    if seq_len >= 1 and len(part) <= seq_len:
        share = 1 - TEXT_TEST_FRACTION if split == "train" else TEXT_TEST_FRACTION
        raise DataError(f"{spec}: its {split} split ({share:.0%} of the file's {len(data)} bytes) has "
                        f"{len(part)} bytes, too short for one window of seq_len+1={seq_len + 1}")
    return WindowSource(part, seq_len, {"name": spec})


def _npz_x(x: np.ndarray, path: str) -> tuple[np.ndarray, dict]:
    """Normalise `x` by its dtype and rank; return it and its info (see `_npz`)."""
    integer = np.issubdtype(x.dtype, np.integer)
    if x.ndim == 3 and not integer:
        x = x[..., None]
    if x.ndim == 4:
        x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
        return x.astype(np.float32), {"kind": "image"}
    if x.ndim == 2 and np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32), {"kind": "points"}
    if x.ndim == 2 and integer:
        return x.astype(np.int32), {"kind": "text"}
    raise DataError(
        f"{path}: cannot use x of shape {x.shape} dtype {x.dtype}; expected float [N,H,W,C] or"
        " [N,H,W] or uint8 [N,H,W,C] (image), float [N,D] (points), int [N,L] (token sequences)"
    )


def _npz(spec, arg, split, seq_len, **options) -> Source:
    """x: float [N,H,W,C] (or [N,H,W]: a channel is added) or uint8 [N,H,W,C] (scaled by 1/255)
    -> image; float [N,D] -> points; int [N,L] -> text (vocab_size = max token + 1).
    Optional int `label` [N] (num_classes = max label + 1)."""
    _no_arg("npz", None, options)
    path = _need_arg("npz", arg, "PATH")
    with _read(path) as f:
        try:
            with np.load(f) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # a corrupt or non-npz file
            raise DataError(f"{path}: not a readable .npz file ({e})") from e
    if "x" not in arrays:
        raise DataError(f"{path}: no array 'x'; found: {', '.join(sorted(arrays)) or 'none'}")
    if "x_test" in arrays:
        if ("label" in arrays) != ("label_test" in arrays):
            raise DataError(f"{path}: give both 'label' and 'label_test', or neither")
        parts = {"train": ("x", "label"), "test": ("x_test", "label_test")}
        split_arrays = {s: {k: arrays[n] for k, n in zip(("x", "label"), ks) if n in arrays}
                        for s, ks in parts.items()}
    else:
        cut = len(arrays["x"]) - int(len(arrays["x"]) * NPZ_TEST_FRACTION)
        keep = {k: arrays[k] for k in ("x", "label") if k in arrays}
        split_arrays = {"train": {k: v[:cut] for k, v in keep.items()},
                        "test": {k: v[cut:] for k, v in keep.items()}}
    out = split_arrays[split]
    x, info = _npz_x(out["x"], path)
    if info["kind"] == "text":
        info["vocab_size"] = int(max(v["x"].max(initial=0) for v in split_arrays.values())) + 1
    arrays_out = {"x": x}
    if "label" in out:
        label = out["label"]
        if label.shape != (len(x),) or not np.issubdtype(label.dtype, np.integer):
            raise DataError(
                f"{path}: label must be int [{len(x)}]; got {label.dtype} {label.shape}"
            )
        arrays_out["label"] = label.astype(np.int32)
        info["num_classes"] = int(max(v["label"].max(initial=0) for v in split_arrays.values())) + 1
    return ArraySource(arrays_out, dict(info, name=spec))


class TfdsSource(Source):
    """A `tfds.data_source` with an image feature: x = image / 255 (float32), label int32."""

    def __init__(self, ds, spec: str, image_key: str, label_key: str):
        feats = ds.dataset_info.features
        if image_key not in feats:
            raise DataError(f"{spec}: no feature {image_key!r}; features: {', '.join(feats)}")
        shape = tuple(feats[image_key].shape)
        if None in shape:
            raise DataError(f"{spec}: images have variable shape {shape}; need a fixed shape")
        self.ds, self.image_key = ds, image_key
        self.label_key = label_key if label_key in feats else None
        self.info = {"kind": "image", "shape": shape, "dtype": "float32", "name": spec}
        num_classes = getattr(feats[label_key], "num_classes", None) if self.label_key else None
        if num_classes:
            self.info["num_classes"] = int(num_classes)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx) -> dict[str, np.ndarray]:
        rows = [self.ds[int(i)] for i in np.asarray(idx).reshape(-1)]
        x = np.stack([np.asarray(r[self.image_key]) for r in rows]) if rows else np.zeros(
            (0, *self.info["shape"]))
        out = {"x": (x / 255.0).astype(np.float32)}
        if self.label_key:
            out["label"] = np.asarray([r[self.label_key] for r in rows], np.int32)
        return out


def _short_tfds_error(name: str, e: Exception) -> str:
    """tfds's message for an unknown dataset lists every registered one (~250 lines): keep its
    first line and the names close to `name` (from that list: tfds.list_builders() would go to
    the network for its community index)."""
    text = str(e)
    if type(e).__name__ != "DatasetNotFoundError":
        return text
    listed = re.findall(r"^\t- (\S+)$", text, flags=re.M)
    close = difflib.get_close_matches(name, listed, n=5, cutoff=0.6)
    first = text.strip().splitlines()[0] if text.strip() else f"Dataset {name} not found."
    if close:
        return f"{first} Close matches: {', '.join(close)}."
    return f"{first} None of the {len(listed)} datasets tfds knows is close." if listed else first


def _tfds(spec, arg, split, seq_len, *, data_dir=None, image_key="image", label_key="label",
          **options) -> Source:
    """Options: data_dir, image_key ("image"), label_key ("label")."""
    _no_arg("tfds", None, options)
    name = _need_arg("tfds", arg, "NAME")
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f'{spec} needs tensorflow-datasets: pip install -e ".[tfds]"') from e
    try:
        ds = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:  # unknown dataset, failed download, missing array_record, ...
        raise DataError(f"{spec}: tfds could not load {name!r} split {split!r}: "
                        f"{_short_tfds_error(name, e)}") from e
    return TfdsSource(ds, spec, image_key, label_key)


def _pydocs_bow(*args, **kwargs) -> Source:
    from zoo.data.bow import load_pydocs_bow

    return load_pydocs_bow(*args, **kwargs)


Builder = Callable[..., Source]
SOURCES: dict[str, tuple[str, Builder]] = {
    "digits": ("scikit-learn's 8x8 handwritten digits in [0,1], 10 classes", _digits),
    "digits_binary": ("the digits thresholded at 0.5 to {0,1}",
                      functools.partial(_digits, binary=True)),
    "toy2d": ("2-D points with known density: toy2d:moons|gaussians8|swissroll", _toy2d),
    "pydocs": ("the Python standard library's docstrings as bytes (pydocs:heldout: the held-out "
               "documents, halved into a fine-tuning train/test)", _pydocs),
    "pydocs_bow": ("the same docstrings as bag-of-words counts (train-split vocabulary)", _pydocs_bow),
    "dates": ("human-written dates -> ISO YYYY-MM-DD as token ids x -> y (seq2seq, generated)", _dates),
    "text": ("a text file as bytes: text:PATH", _text),
    "npz": ("arrays x (and label) from an .npz file: npz:PATH", _npz),
    "tfds": ("a tensorflow-datasets image dataset: tfds:NAME (optional extra)", _tfds),
}


def load(spec: str, split: str = "train", *, seq_len: int = 128, **options: Any) -> Source:
    """The `split` ("train" | "test") of data source `spec` ("name" or "name:arg")."""
    check_split(split)
    name, _, arg = spec.partition(":")
    if name not in SOURCES:
        raise DataError(unknown("data source", name, SOURCES))
    return SOURCES[name][1](spec, arg or None, split, seq_len, **options)
