"""Loader: determinism, resume, epoch coverage, process sharding; eval_batches."""

import numpy as np
import pytest

from zoo.data import Loader, eval_batches, load
from zoo.errors import DataError


@pytest.fixture
def small_npz(tmp_path):
    """40 train / 4 test examples (last 10%) whose x is the row number; labels = row % 3."""
    n = 44
    x = np.arange(n, dtype=np.float32)[:, None].repeat(3, 1)
    path = tmp_path / "small.npz"
    np.savez(path, x=x, label=np.arange(n) % 3)
    return str(path)


def _rows(batch):
    return batch["x"][:, 0].astype(int)


def test_same_seed_same_batches_different_seed_differs():
    src = load("digits")
    a, b, c = Loader(src, 32, seed=1), Loader(src, 32, seed=1), Loader(src, 32, seed=2)
    for s in (0, 5, 44, 45, 1000):
        for k in ("x", "label", "idx"):
            np.testing.assert_array_equal(a.batch(s)[k], b.batch(s)[k])
    assert not np.array_equal(a.batch(0)["x"], c.batch(0)["x"])


def test_resume_is_independent_of_history():
    src = load("digits")
    fresh = Loader(src, 50, seed=3).batch(123)
    used = Loader(src, 50, seed=3)
    for s in range(0, 130, 7):
        used.batch(s)
    np.testing.assert_array_equal(used.batch(123)["x"], fresh["x"])


def test_stream_matches_concatenated_epoch_permutations(small_npz):
    src = load(f"npz:{small_npz}")  # 40 train rows, values 0..39
    n, bsz, seed = len(src), 12, 7  # 12 does not divide 40: batches straddle epochs
    assert n == 40
    stream = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(5)])
    loader = Loader(src, bsz, seed)
    for s in range(15):
        np.testing.assert_array_equal(_rows(loader.batch(s)), stream[s * bsz : (s + 1) * bsz])
    assert loader.epoch(10) == pytest.approx(3.0)


def test_one_epoch_covers_every_example_once(small_npz):
    src = load(f"npz:{small_npz}")
    loader = Loader(src, 8, seed=0)  # 40 % 8 == 0
    for epoch in range(2):
        seen = np.concatenate([_rows(loader.batch(s)) for s in range(epoch * 5, epoch * 5 + 5)])
        np.testing.assert_array_equal(np.sort(seen), np.arange(40))
    labels = np.concatenate([loader.batch(s)["label"] for s in range(5)])
    seen = np.concatenate([_rows(loader.batch(s)) for s in range(5)])
    np.testing.assert_array_equal(labels, seen % 3)


def test_batch_larger_than_dataset(small_npz):
    batch = Loader(load(f"npz:{small_npz}"), 100, seed=0).batch(0)
    counts = np.bincount(_rows(batch), minlength=40)
    assert counts.sum() == 100 and counts.min() >= 2 and counts.max() <= 3


@pytest.mark.parametrize("procs", [2, 4])
def test_process_slices_concatenate_to_global_batch(procs):
    src = load("digits")
    whole = Loader(src, 64, seed=5).batch(17)
    np.testing.assert_array_equal(whole["idx"], np.arange(64))
    parts = [Loader(src, 64, seed=5, process_index=p, process_count=procs).batch(17)
             for p in range(procs)]
    for k in ("x", "label", "idx"):
        np.testing.assert_array_equal(np.concatenate([b[k] for b in parts]), whole[k])
    b = 64 // procs
    for p, part in enumerate(parts):
        assert part["idx"].dtype == np.int32
        np.testing.assert_array_equal(part["idx"], np.arange(p * b, (p + 1) * b))


def test_loader_errors():
    src = load("digits")
    with pytest.raises(DataError, match="divisible"):
        Loader(src, 10, seed=0, process_count=3)
    with pytest.raises(DataError, match="batch_size"):
        Loader(src, 0, seed=0)
    with pytest.raises(DataError, match="process_index"):
        Loader(src, 8, seed=0, process_index=2, process_count=2)


def test_eval_batches_in_order():
    src = load("digits", "test")  # 360 examples
    batches = list(eval_batches(src, 100))
    assert [len(b["x"]) for b in batches] == [100, 100, 100, 60]
    xs = np.concatenate([b["x"] for b in batches])
    np.testing.assert_array_equal(xs, src[np.arange(360)]["x"])
    np.testing.assert_array_equal(batches[-1]["idx"], np.arange(60))
    assert batches[0]["label"].dtype == np.int32


def test_unshuffled_loader_walks_the_source_in_order():
    import numpy as np

    from zoo.data.source import ArraySource, Loader

    src = ArraySource({"x": np.arange(10, dtype=np.float32)[:, None]}, {"kind": "points", "name": "n"})
    loader = Loader(src, 4, seed=3, shuffle=False)
    got = np.concatenate([loader.batch(s)["x"][:, 0] for s in range(5)])
    np.testing.assert_array_equal(got, np.arange(20) % 10)
