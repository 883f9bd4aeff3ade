"""`zoo eval`'s loop: means over the split against NumPy, and its progress bar on a terminal."""

import io
import sys

import jax.numpy as jnp
import numpy as np

from zoo.data.source import ArraySource
from zoo.eval.run import evaluate
from zoo.models.base import ModelDef


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _model():
    # a per-example metric that depends on the data and on the global index evaluate assigns
    return ModelDef(init=None, loss=None,
                    evaluate=lambda params, key, batch: {"m": batch["x"].sum(-1) * params["w"] + batch["idx"]})


def _source(n):
    x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
    return x, ArraySource({"x": x}, {"name": "toy", "kind": "vector", "shape": (3,)})


def test_means_over_the_split_and_max_examples():
    x, src = _source(23)
    params = {"w": jnp.float32(2.0)}
    out = evaluate(_model(), params, src, batch_size=5)
    assert out["examples"] == 23
    np.testing.assert_allclose(out["m"], np.mean(x.sum(-1) * 2.0 + np.arange(23)), rtol=1e-6)
    out = evaluate(_model(), params, src, batch_size=5, max_examples=12)
    assert out["examples"] == 12
    np.testing.assert_allclose(out["m"], np.mean(x[:12].sum(-1) * 2.0 + np.arange(12)), rtol=1e-6)


def test_progress_bar_only_on_a_terminal(monkeypatch):
    _, src = _source(23)
    params = {"w": jnp.float32(1.0)}
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    evaluate(_model(), params, src, batch_size=5, max_examples=12, show_progress=True)
    assert "12/12" in term.getvalue() and "example" in term.getvalue()
    term2 = _Terminal()
    monkeypatch.setattr(sys, "stderr", term2)
    evaluate(_model(), params, src, batch_size=5, show_progress=False)
    assert term2.getvalue() == ""
    pipe = io.StringIO()  # not a terminal: no bar even when asked
    monkeypatch.setattr(sys, "stderr", pipe)
    evaluate(_model(), params, src, batch_size=5, show_progress=True)
    assert pipe.getvalue() == ""
