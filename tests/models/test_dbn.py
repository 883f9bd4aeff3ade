"""dbn: the phase schedule freezes each finished layer; the head learns well above chance."""

import jax
import numpy as np
import pytest

from zoo import registry
from zoo.data import Loader, load
from zoo.errors import ConfigError
from zoo.train.loop import train
from zoo.train.state import init_state


def test_phases_train_one_part_at_a_time():
    import ml_collections

    src = load("digits_binary")
    cfg = ml_collections.ConfigDict({"hidden": (16, 8), "steps_per_layer": 3, "sample_steps": 5})
    model = registry.get("dbn").build(cfg, src.info)
    loader = Loader(src, 32, 0)
    batch = loader.batch(0)
    key = jax.random.PRNGKey(0)
    state = init_state(model.init(key, batch), _NoTx(), 0.0, model.init_extra(key, batch))
    step = jax.jit(model.step)
    snaps = [state.params]
    for s in range(9):
        state, metrics = step(state, jax.random.fold_in(key, s), loader.batch(s))
        state = state.replace(step=state.step + 1)
        snaps.append(state.params)
        assert float(metrics["phase"]) == min(s // 3, 2)

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    layer0 = [p["rbms"][0] for p in snaps]
    layer1 = [p["rbms"][1] for p in snaps]
    head = [p["head"] for p in snaps]
    assert not same(layer0[0], layer0[3]) and all(same(layer0[3], x) for x in layer0[3:])
    assert same(layer1[0], layer1[3]) and not same(layer1[3], layer1[6]) and all(same(layer1[6], x) for x in layer1[6:])
    assert all(same(head[0], x) for x in head[:7]) and not same(head[6], head[9])


class _NoTx:
    """The dbn's custom step ignores the optimizer; init_state only needs .init."""

    def init(self, params):
        return ()


def test_short_run_classifies_well_above_chance():
    src, test = load("digits_binary"), load("digits_binary", "test")
    c = registry.get("dbn").config()
    c.name, c.steps, c.log_every = "dbn", 600, 100
    c.model.hidden, c.model.steps_per_layer, c.model.sample_steps = (64, 32), 200, 10
    model = registry.get("dbn").build(c.model, src.info)
    result = train(model, c, src, show_progress=False)
    out = model.evaluate(result.state.params, jax.random.PRNGKey(0), test[np.arange(len(test))])
    assert float(np.mean(out["accuracy"])) > 0.7
    x = np.asarray(model.sample(result.state.params, jax.random.PRNGKey(0), 4))
    assert x.shape == (4, 8, 8, 1) and 0 <= x.min() and x.max() <= 1


def test_bad_config():
    c = registry.get("dbn").config().model
    c.hidden = ()
    with pytest.raises(ConfigError, match="hidden"):
        registry.get("dbn").build(c, {"shape": (8, 8, 1), "num_classes": 10, "name": "d"})
