"""The diffusion benchmark: rows are well formed; with diffusers installed the peer is the same
network (equal parameter counts, ported outputs agree) and its DDIM loop gives the zoo's samples;
without it the peer rows are absent."""

import copy
import dataclasses
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from zoo.bench import diffusion as bench
from zoo.nn.unet import UNetConfig, from_diffusers
from zoo.ops.lora import count_params

TINY = UNetConfig(in_channels=3, block_out_channels=(8, 16), layers_per_block=1, attention_levels=(False, True),
                  norm_num_groups=4, attention_head_dim=4)
SPEC = bench.Spec("unet-tiny", TINY, batch=2, size=8, dtypes=("f32",), ddim_steps=4, calls=1, rounds=1,
                  ddim_rounds=1)


@pytest.fixture(autouse=True)
def _no_pause(monkeypatch):
    monkeypatch.setattr(bench, "PAUSE_S", 0.0)


@pytest.fixture(scope="module")
def models():
    pytest.importorskip("diffusers")
    pytest.importorskip("torch")
    return bench.make_models(TINY)


def _check_rows(rows, impls):
    assert [r["impl"] for r in rows] == impls
    for r in rows:
        assert {"case", "impl", "value", "unit"} <= set(r)
        assert r["value"] > 0 and np.isfinite(r["value"])
        ddim = "ddim" in r["impl"]
        assert r["unit"] == ("images/s" if ddim else "img-NFE/s")
        assert r["case"] == ("unet-tiny B2 ddim4 f32" if ddim else "unet-tiny B2 denoiser f32")


def test_rows_with_the_diffusers_peer(models):
    rows = bench.bench_spec(SPEC, torch_threads=1, models=models)  # one thread: fast on a busy machine
    _check_rows(rows, ["zoo-f32", "diffusers-eager-f32", "zoo-ddim4-scan", "diffusers-ddim4-loop"])
    assert all(r["threads"] == 1 for r in rows)


def test_rows_without_diffusers_have_no_peer(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers raises ImportError
    assert bench.load_peer() is None
    _check_rows(bench.bench_spec(dataclasses.replace(SPEC, ddim_dtype=None)), ["zoo-f32"])


def test_peer_is_the_same_network(models):
    torch = pytest.importorskip("torch")
    params, model = models
    assert count_params(params) == sum(p.numel() for p in model.parameters())
    model = copy.deepcopy(model)
    with torch.no_grad():  # off the init (GroupNorm 1 / 0), so that swapped weights would show
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    params = from_diffusers(model.state_dict(), TINY)
    r = np.random.default_rng(0)
    x = r.standard_normal((2, 8, 8, 3)).astype(np.float32)
    t = np.array([3, 900], np.int32)
    assert bench.check_agreement(TINY, params, model, x, t) < 1e-4
    params["conv_out"]["bias"] = params["conv_out"]["bias"] + 1.0
    with pytest.raises(AssertionError, match="outputs differ"):
        bench.check_agreement(TINY, params, model, x, t)


def test_diffusers_ddim_loop_gives_the_zoo_samples(models):
    params, model = models
    assert bench.diffusers_ddim_scheduler(4).timesteps.tolist() == [999, 749, 499, 249]
    x_T = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
    ours = bench._zoo_ddim(TINY, params, "float32", x_T, 4)()
    with bench._torch_threads(1):
        theirs = bench._torch_ddim(model, "float32", x_T, 4)().numpy().transpose(0, 2, 3, 1)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-3, rtol=1e-3)
