"""Model-owned state (TrainState.extra) threads through the stateful loss, pmap and checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.helpers import flat, tiny_vae_config
from zoo.data import load
from zoo.models.base import ModelDef
from zoo.train.loop import train


def _counting_model() -> ModelDef:
    """extra = {"n": steps seen, "sum": running sum of batch means}: checkable by hand."""

    def loss(params, key, batch, extra):
        val = jnp.sum((params["w"] - jnp.mean(batch["x"])) ** 2)
        new = {"n": extra["n"] + 1, "sum": extra["sum"] + jnp.mean(batch["x"])}
        return val, ({"loss": val}, new)

    return ModelDef(init=lambda key, batch: {"w": jnp.zeros(())}, loss=loss,
                    init_extra=lambda key, batch: {"n": jnp.zeros((), jnp.int32), "sum": jnp.zeros(())})


@pytest.mark.parametrize("parallel", ["jit", "fsdp"])
def test_extra_threads_through_steps_and_resume(tmp_path, parallel):
    from zoo.data import Loader

    config = tiny_vae_config(steps=10, ckpt_every=5, parallel=parallel)
    source = load("digits_binary")
    result = train(_counting_model(), config, source, workdir=str(tmp_path / "a"), show_progress=False)
    loader = Loader(source, 32, 0)
    expected = sum(float(np.mean(loader.batch(s)["x"])) for s in range(10))
    assert int(result.state.extra["n"]) == 10
    np.testing.assert_allclose(float(result.state.extra["sum"]), expected, rtol=1e-5)
    # 5 steps, then resume to 10: the extra comes back from the checkpoint
    train(_counting_model(), tiny_vae_config(steps=5, ckpt_every=5, parallel=parallel), source,
          workdir=str(tmp_path / "b"), show_progress=False)
    resumed = train(_counting_model(), config, source, workdir=str(tmp_path / "b"), show_progress=False)
    np.testing.assert_array_equal(flat(resumed.state.extra), flat(result.state.extra))


def test_pmap_refuses_model_state():
    from zoo.errors import ConfigError

    with pytest.raises(ConfigError, match="use jit or fsdp"):
        train(_counting_model(), tiny_vae_config(parallel="pmap"), load("digits_binary"), show_progress=False)
