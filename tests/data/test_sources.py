"""Sources checked against independent references: sklearn's raw digits, file bytes, quadrature."""

import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits

from zoo.data import SOURCES, load, toy2d
from zoo.errors import DataError


def test_digits_values_split_and_labels():
    d = load_digits()
    order = np.random.default_rng(0).permutation(1797)
    train, test = load("digits"), load("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.info == {"kind": "image", "shape": (8, 8, 1), "dtype": "float32",
                          "num_classes": 10, "name": "digits"}
    for src, rows in ((train, order[:1437]), (test, order[1437:])):
        batch = src[np.arange(len(src))]
        assert batch["x"].dtype == np.float32 and batch["label"].dtype == np.int32
        np.testing.assert_allclose(batch["x"][..., 0], d.images[rows] / 16.0, rtol=1e-6)
        np.testing.assert_array_equal(batch["label"], d.target[rows])
    assert len(set(order[:1437]) & set(order[1437:])) == 0
    assert train[np.arange(1437)]["x"].max() == 1.0


def test_digits_binary_threshold():
    d = load_digits()
    order = np.random.default_rng(0).permutation(1797)[1437:]
    x = load("digits_binary", "test")[np.arange(360)]["x"]
    np.testing.assert_array_equal(x[..., 0], (d.images[order] > 8).astype(np.float32))
    assert set(np.unique(x)) == {0.0, 1.0}


@pytest.mark.parametrize("name", toy2d.NAMES)
def test_toy2d_sets(name):
    train, test = load(f"toy2d:{name}"), load(f"toy2d:{name}", "test")
    assert (len(train), len(test)) == (20_000, 5_000)
    assert train.info["kind"] == "points" and train.info["shape"] == (2,)
    a = train[np.arange(100)]["x"]
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, load(f"toy2d:{name}")[np.arange(100)]["x"])
    assert not np.allclose(a, test[np.arange(100)]["x"])


@pytest.mark.parametrize("name, half", [("gaussians8", 3.5), ("moons", 3.0), ("swissroll", 4.0)])
def test_log_density_integrates_to_one(name, half):
    g = np.linspace(-half, half, 141)
    grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    mass = np.exp(toy2d.log_density(name, grid, nodes=512)).sum() * (g[1] - g[0]) ** 2
    assert mass == pytest.approx(1.0, abs=2e-3)


def test_gaussians8_log_density_closed_form():
    x = toy2d.points("gaussians8", "test")[:500]
    off = np.zeros((500, 2))  # the centre of the ring: far from every component
    assert toy2d.log_density("gaussians8", x).mean() > toy2d.log_density("gaussians8", off).max()
    # closed form at a component centre: log( (1/8) N(0; 0, s^2 I) + tiny )
    centre = np.array([[2.0, 0.0]])
    assert toy2d.log_density("gaussians8", centre)[0] == pytest.approx(
        np.log(1 / 8 / (2 * np.pi * 0.2**2)), abs=1e-6)


def test_unknown_names_list_valid_ones():
    with pytest.raises(DataError, match="unknown data source 'nope'; valid: .*digits, digits_binary, "):
        load("nope")
    with pytest.raises(DataError, match="pydocs:heldout"):
        load("pydocs:train")
    with pytest.raises(DataError) as e:
        load("toy2d:circle")
    assert all(n in str(e.value) for n in toy2d.NAMES)
    with pytest.raises(DataError, match="split"):
        load("digits", "valid")
    with pytest.raises(DataError, match="toy2d:"):
        load("toy2d")
    with pytest.raises(DataError, match="no options; got colour"):
        load("digits", colour=True)
    assert set(SOURCES) >= {"digits", "digits_binary", "toy2d", "pydocs", "text", "npz", "tfds"}


def test_text_windows_reproduce_file(tmp_path):
    data = bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8))
    path = tmp_path / "t.txt"
    path.write_bytes(data)
    train, test = load(f"text:{path}", seq_len=16), load(f"text:{path}", "test", seq_len=16)
    cut = int(2000 * 0.95)
    assert train.info["shape"] == (17,) and train.info["vocab_size"] == 256
    x = train[np.arange(len(train))]["x"]
    assert x.dtype == np.int32 and len(train) == (cut - 1) // 16
    for i in (0, 1, len(train) - 1):
        assert bytes(x[i].astype(np.uint8)) == data[i * 16 : i * 16 + 17]
    np.testing.assert_array_equal(x[1:, 0], x[:-1, -1])  # windows share their boundary byte
    assert bytes(test[[0]]["x"][0].astype(np.uint8)) == data[cut : cut + 17]
    with pytest.raises(DataError, match="missing.txt"):
        load(f"text:{tmp_path / 'missing.txt'}")
    # 2000 bytes: the test split's 100 hold no 101-byte window; the train split's 1900 do
    assert len(load(f"text:{path}", seq_len=100)) == (1900 - 1) // 100
    with pytest.raises(DataError, match=r"its test split \(5% of the file's 2000 bytes\) has 100 bytes, too "
                                        r"short for one window of seq_len\+1=101"):
        load(f"text:{path}", "test", seq_len=100)


def test_npz_sources_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.random((30, 4, 4, 1)).astype(np.float32)
    np.savez(tmp_path / "a.npz", x=imgs, label=np.arange(30) % 5)
    tr, te = load(f"npz:{tmp_path / 'a.npz'}"), load(f"npz:{tmp_path / 'a.npz'}", "test")
    assert (len(tr), len(te)) == (27, 3)
    assert tr.info["kind"] == "image" and tr.info["num_classes"] == 5
    np.testing.assert_array_equal(te[np.arange(3)]["x"], imgs[27:])

    np.savez(tmp_path / "b.npz", x=rng.random((10, 2)), x_test=rng.random((4, 2)))
    b = load(f"npz:{tmp_path / 'b.npz'}", "test")
    assert len(b) == 4 and b.info["kind"] == "points" and b.info["dtype"] == "float32"

    np.savez(tmp_path / "c.npz", images=imgs)
    with pytest.raises(DataError, match="no array 'x'; found: images"):
        load(f"npz:{tmp_path / 'c.npz'}")
    np.savez(tmp_path / "d.npz", x=rng.random((5, 2, 2, 2, 2)))
    with pytest.raises(DataError, match="shape"):
        load(f"npz:{tmp_path / 'd.npz'}")
    np.savez(tmp_path / "e.npz", x=imgs, label=np.zeros((30, 2), int))
    with pytest.raises(DataError, match="label"):
        load(f"npz:{tmp_path / 'e.npz'}")
    with pytest.raises(DataError, match="not found"):
        load(f"npz:{tmp_path / 'nope.npz'}")


def test_tfds_mock_mnist():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        src = load("tfds:mnist")
        assert len(src) == 12
        assert src.info["shape"] == (28, 28, 1) and src.info["num_classes"] == 10
        batch = src[np.array([3, 0])]
        raw = tfds.data_source("mnist", split="train")[3]
        assert batch["x"].dtype == np.float32 and batch["label"].dtype == np.int32
        np.testing.assert_allclose(batch["x"][0], raw["image"] / 255.0, rtol=1e-6)
        assert batch["label"][0] == raw["label"]
        from zoo.data import Loader

        assert Loader(src, 4, seed=0).batch(2)["x"].shape == (4, 28, 28, 1)


def test_tfds_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now raises ImportError
    with pytest.raises(DataError, match=r'pip install -e "\.\[tfds\]"'):
        load("tfds:mnist")


def test_tfds_unknown_name_is_one_short_line(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    # tfds's own message lists every registered dataset (~250 lines); ours keeps its first line
    # and the close names.
    with pytest.raises(DataError) as info:
        load("tfds:mnistt", data_dir=str(tmp_path))
    msg = str(info.value)
    assert "mnistt" in msg and "Close matches: mnist" in msg
    assert len(msg.splitlines()) == 1 and len(msg) < 300
    with pytest.raises(DataError, match="None of the [0-9]+ datasets tfds knows is close"):
        load("tfds:qqqqqqqqqqqq", data_dir=str(tmp_path))
