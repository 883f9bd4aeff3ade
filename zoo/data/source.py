"""Sources (random-access example sets) and the stateless, resumable, per-process `Loader`.

A `Source` is `len(src)`, `src[idx_B] -> {name: array_Bx...}` and `src.info` (see `Source`).
The `Loader` is a pure function of the optimizer step: the global example stream is the
concatenation of permutations `perm_e = default_rng([seed, e]).permutation(N)` for epochs
e = 0, 1, 2, ...; step s takes stream[s*B : (s+1)*B], and process p of P takes the contiguous
slice [p*B/P, (p+1)*B/P) of it. Resuming at step s therefore needs nothing but s.

Glossary: N examples in the source, B global batch size, P processes, b = B/P per process.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from zoo.errors import DataError, unknown


SPLITS = ("train", "test")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(unknown("split", split, SPLITS))


class Source:
    """A random-access example set.

    `info` keys: "kind" ("image" | "points" | "text"), "shape" (per-example shape of "x"),
    "dtype" ("float32" | "int32"), "name" (the spec), and optionally "num_classes",
    "vocab_size" (256 for bytes).
    """

    info: dict[str, Any]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, idx) -> dict[str, np.ndarray]:
        raise NotImplementedError


class ArraySource(Source):
    """Examples held as in-memory arrays sharing a leading dimension."""

    def __init__(self, arrays: dict[str, np.ndarray], info: dict[str, Any]):
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise DataError(f"{info.get('name')}: arrays differ in length: {sizes}")
        self.arrays = arrays
        self.info = dict(info, shape=tuple(arrays["x"].shape[1:]), dtype=str(arrays["x"].dtype))

    def __len__(self) -> int:
        return len(self.arrays["x"])

    def __getitem__(self, idx) -> dict[str, np.ndarray]:
        idx = np.asarray(idx)
        return {k: v[idx] for k, v in self.arrays.items()}


class WindowSource(Source):
    """Byte text: example i is bytes [i*L, i*L + L + 1); targets are the inputs shifted by one."""

    def __init__(self, data: np.ndarray, seq_len: int, info: dict[str, Any]):
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        n = (len(data) - 1) // seq_len
        if n < 1:
            raise DataError(
                f"{info.get('name')}: {len(data)} bytes is too short for one window of seq_len+1="
                f"{seq_len + 1}"
            )
        self.data, self.seq_len, self._n = data.astype(np.uint8, copy=False), seq_len, n
        self.info = dict(info, kind="text", shape=(seq_len + 1,), dtype="int32", vocab_size=256)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, idx) -> dict[str, np.ndarray]:
        idx = np.asarray(idx)
        if idx.size and (idx.min() < 0 or idx.max() >= self._n):
            raise IndexError(f"window index out of range [0, {self._n})")
        pos_BxL = idx[..., None] * self.seq_len + np.arange(self.seq_len + 1)
        return {"x": self.data[pos_BxL].astype(np.int32)}


class Loader:
    """Global batch `step` of a seeded epoch-permutation stream; this process's slice of it."""

    def __init__(
        self,
        src: Source,
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        drop_remainder: bool = True,
        shuffle: bool = True,
    ):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} not in [0, {process_count})")
        if batch_size % process_count:
            raise DataError(
                f"batch_size {batch_size} is not divisible by process_count {process_count}"
            )
        if len(src) < 1:
            raise DataError(f"data source {src.info.get('name')!r} is empty")
        # drop_remainder is accepted for API symmetry: the stream is endless (it crosses epoch
        # boundaries), so every training batch is full and nothing is ever dropped.
        self.src, self.batch_size, self.seed = src, batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.drop_remainder, self.shuffle = drop_remainder, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:  # a batch spans few epochs; keep memory bounded
                self._perms.clear()
            if not self.shuffle:  # corpus order every epoch (e.g. to match a peer that does not shuffle)
                self._perms[epoch] = np.arange(len(self.src))
            else:
                self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.src))
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Source indices of this process's examples for `step` (int64 [b])."""
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        n, b = len(self.src), self.batch_size // self.process_count
        start = step * self.batch_size + self.process_index * b
        parts = []
        for e in range(start // n, (start + b - 1) // n + 1):  # the epochs this slice touches
            lo, hi = max(start, e * n), min(start + b, (e + 1) * n)
            parts.append(self._perm(e)[lo - e * n: hi - e * n])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of the global batch for optimizer step `step`."""
        out = dict(self.src[self.indices(step)])
        b = self.batch_size // self.process_count
        out["idx"] = np.arange(self.process_index * b, (self.process_index + 1) * b, dtype=np.int32)
        return out

    def epoch(self, step: int) -> float:
        """Epochs completed before `step` (fractional)."""
        return step * self.batch_size / len(self.src)


def eval_batches(src: Source, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order; the last batch may be smaller. "idx": position in batch."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(src), batch_size):
        stop = min(start + batch_size, len(src))
        out = dict(src[np.arange(start, stop)])
        out["idx"] = np.arange(stop - start, dtype=np.int32)
        yield out
