"""Same seed, same global batch -> the same losses on 1 device, 8 devices, FSDP and pmap."""

import jax
import numpy as np
import pytest

from tests.train.helpers import flat, losses, run, tiny_vae_config


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    wd = tmp_path_factory.mktemp("one")
    result = run(tiny_vae_config(), wd, devices=jax.devices()[:1])
    return losses(wd), flat(result.state.params)


def test_eight_devices_equal_one(one_device, tmp_path):
    assert jax.device_count() == 8
    result = run(tiny_vae_config(), tmp_path)
    ref_losses, ref_params = one_device
    assert len(losses(tmp_path)) == 12
    np.testing.assert_allclose(losses(tmp_path), ref_losses, rtol=2e-5)
    np.testing.assert_allclose(flat(result.state.params), ref_params, rtol=1e-4, atol=1e-6)
    # and training did something: the loss moved
    assert abs(ref_losses[-1] - ref_losses[0]) > 1.0


@pytest.mark.parametrize("parallel", ["pmap", "fsdp"])
def test_strategy_equals_jit(one_device, tmp_path, parallel):
    result = run(tiny_vae_config(parallel=parallel), tmp_path)
    np.testing.assert_allclose(losses(tmp_path), one_device[0], rtol=2e-5)
    np.testing.assert_allclose(flat(result.state.params), one_device[1], rtol=1e-4, atol=1e-6)


def test_fsdp_shards_big_params():
    from zoo.train.sharding import fsdp_spec
    from jax.sharding import PartitionSpec as P

    assert fsdp_spec((64, 32), 8, 64) == P("data", None)
    assert fsdp_spec((3, 40), 8, 64) == P(None, "data")
    assert fsdp_spec((3, 5), 8, 1) == P()          # nothing divisible: replicated
    assert fsdp_spec((64, 32), 8, 10**6) == P()    # below the size threshold


def test_batch_not_divisible_by_devices():
    from zoo.errors import ConfigError

    with pytest.raises(ConfigError, match="divisible by the 8 devices"):
        run(tiny_vae_config(batch_size=30))
