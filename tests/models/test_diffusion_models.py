"""ddpm / dit / score2d: guidance limits against the ops called by hand, per-example noise, training
through the loop and the CLI, the named DDPM CIFAR-10 config's size, and config errors."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.models  # noqa: F401  (registers the models)
from zoo import cli, registry
from zoo.data import ArraySource, load, toy2d
from zoo.errors import ConfigError, DataError
from zoo.models.ddpm import DiffusionConfig
from zoo.models.dit import make_dit
from zoo.nn.dit import DiT, DiTConfig
from zoo.ops import diffusion as D
from zoo.ops.lora import count_params
from zoo.train.loop import train
from zoo.train.metrics import read_metrics
from zoo.xla import init_compiler_options

SHAPE = (8, 8, 1)
TINY_DIT = dict(width=16, depth=1, num_heads=2, patch_size=2)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _batch(b=6, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": jnp.asarray(rng.random((b, *SHAPE)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, b), jnp.int32), "idx": jnp.arange(b, dtype=jnp.int32)}


@pytest.fixture(scope="module")
def dit():
    """A tiny class-conditional DiT with its zero-initialised layers perturbed (else eps == 0)."""
    dcfg = DiffusionConfig(SHAPE, num_classes=10, num_timesteps=50)
    model = make_dit(dcfg, **TINY_DIT)
    params = jax.jit(model.init, compiler_options=init_compiler_options())(jax.random.key(0), _batch())
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    net = DiT(DiTConfig(SHAPE, num_classes=10, **TINY_DIT))
    return dcfg, model, params, net


def test_guidance_limits_match_the_ops_called_by_hand(dit):
    """scale 1 = the conditional model, 0 = the unconditional (null label), 3 = eps_u + 3 (eps_c - eps_u)."""
    dcfg, model, params, net = dit
    schedule = D.make_schedule(dcfg.schedule, dcfg.num_timesteps)
    key, n, label = jax.random.key(2), 4, 7
    apply = lambda y: (lambda x, t: net.apply({"params": params}, x, t, jnp.full((len(x),), y, jnp.int32)))

    def by_hand(eps_fn):
        x = D.ddim_sample(key, eps_fn, schedule, (n, *SHAPE), 4, clip_x0=1.0)
        return np.clip((np.asarray(x) + 1) / 2, 0, 1)

    def sampled(guidance):
        req = {"n": n, "sampler": "ddim", "steps": 4, "guidance": guidance, "label": label}
        return np.asarray(model.generate(params, key, req)["images"]["samples"])

    np.testing.assert_allclose(sampled(1.0), by_hand(apply(label)), atol=2e-5)
    np.testing.assert_allclose(sampled(0.0), by_hand(apply(10)), atol=2e-5)
    guided = lambda x, t: D.classifier_free_guidance(apply(label)(x, t), apply(10)(x, t), 3.0)
    np.testing.assert_allclose(sampled(3.0), by_hand(guided), atol=2e-5)
    assert np.abs(sampled(3.0) - sampled(1.0)).max() > 1e-2   # the guidance actually changes the samples


def test_noise_is_per_example(dit):
    """An example's held-out MSE depends on its idx, not on which batch it sits in (any mesh agrees)."""
    _, model, params, _ = dit
    full = _batch(8)
    part = {k: v[2:5] for k, v in full.items()}
    evaluate = jax.jit(model.evaluate)
    a = np.asarray(evaluate(params, jax.random.key(3), full)["mse"])
    b = np.asarray(evaluate(params, jax.random.key(3), part)["mse"])
    np.testing.assert_allclose(a[2:5], b, rtol=1e-5)
    assert len(set(np.round(a, 6))) == 8   # and examples do get different draws


def test_generate_errors_are_one_line(dit):
    _, model, params, _ = dit
    for req, match in [({"sampler": "euler"}, "valid: ddim, ddpm, dpm_solver"),
                       ({"sampler": "ddpm", "steps": 10}, "always runs all 50 steps"),
                       ({"sampler": "ddim", "steps": 51}, r"num_steps must be in \[1, 50\]"),
                       ({"label": 10}, r"--label must be in \[0, 9\]")]:
        with pytest.raises(ConfigError, match=match):
            model.generate(params, jax.random.key(0), req)
    uncond = make_dit(DiffusionConfig(SHAPE, num_timesteps=50), **TINY_DIT)
    for req, match in [({"label": 3}, "--label needs a class-conditional"),
                       ({"guidance": 2.0}, "--guidance needs a class-conditional")]:
        with pytest.raises(ConfigError, match=match):
            uncond.generate(None, jax.random.key(0), req)
    with pytest.raises(DataError, match=r"per-example shape \(4, 4, 1\)"):
        model.loss(params, jax.random.key(0), {"x": jnp.zeros((2, 4, 4, 1)), "label": jnp.zeros(2, jnp.int32),
                                               "idx": jnp.arange(2)})


def test_registry_config_errors():
    img = {"kind": "image", "shape": SHAPE, "name": "npz:x"}
    pts = {"kind": "points", "shape": (2,), "name": "toy2d:moons"}
    for name in ("ddpm", "dit"):
        entry = registry.get(name)
        c = entry.config().model
        with pytest.raises(ConfigError, match="need image data"):
            entry.build(c, pts)
        c.num_classes = 10
        with pytest.raises(ConfigError, match="has no classes"):
            entry.build(c, img)
        c.num_classes, c.sampler = 0, "heun"
        with pytest.raises(ConfigError, match="valid: ddim, ddpm, dpm_solver"):
            entry.build(c, img)
        c.sampler, c.prediction = "ddim", "x0"
        with pytest.raises(ConfigError, match="valid: eps, v"):
            entry.build(c, img)
    c = registry.get("ddpm").config().model
    c.block_out_channels = (36, 64)   # GroupNorm(8) cannot split 36 channels
    with pytest.raises(ConfigError):
        registry.get("ddpm").build(c, img)
    with pytest.raises(ConfigError, match="score2d needs 2-D points"):
        registry.get("score2d").build(registry.get("score2d").config().model, img)


def test_ddpm_cifar10_config_is_the_35_7m_unet():
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "experiments", "ddpm_cifar10.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    info = {"kind": "image", "shape": (32, 32, 3), "num_classes": 10, "name": "tfds:cifar10"}
    model = registry.get("ddpm").build(c.model, info)
    batch = {"x": jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32), "idx": jax.ShapeDtypeStruct((2,), jnp.int32)}
    shapes = jax.eval_shape(model.init, jax.random.key(0), batch)
    assert count_params(shapes) == 35_746_307   # diffusers 0.42.1 UNet2DModel, same settings


def _digits(n=64):
    full = load("digits")
    return ArraySource({k: v for k, v in full[np.arange(n)].items() if k != "idx"}, full.info)


def test_ddpm_trains_samples_and_evaluates_through_the_cli(tmp_path, capsys):
    """Train a tiny class-conditional UNet on 8 fake devices, then `zoo sample` with guidance and `zoo eval`."""
    wd = str(tmp_path / "ddpm")
    args = ["train", "ddpm", "--workdir", wd, "--steps", "25", "--no-progress", "batch_size=32", "log_every=1",
            "optimizer.lr=3e-3", "ema_decay=0.5", "model.num_classes=10", "model.num_timesteps=100",
            "model.block_out_channels=(16, 32)", "model.norm_num_groups=8", "model.layers_per_block=1",
            "model.attention_head_dim=8"]
    assert cli.main(args) == 0
    losses = [m["loss"] for m in read_metrics(os.path.join(wd, "metrics.jsonl"))]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
    capsys.readouterr()
    assert cli.main(["sample", "ddpm", "--workdir", wd, "--sampler", "ddim", "--steps", "5", "--n", "10",
                     "--guidance", "2", "--label", "3"]) == 0
    assert capsys.readouterr().out.strip().endswith("samples.png")
    assert os.path.getsize(os.path.join(wd, "samples.png")) > 100
    assert cli.main(["eval", "ddpm", "--workdir", wd, "eval.max_examples=64"]) == 0
    out = capsys.readouterr().out
    assert '"mse"' in out and '"examples": 64' in out


def test_score2d_learns_and_reports_the_true_density():
    c = registry.get("score2d").config()
    c.name, c.steps, c.batch_size, c.log_every, c.ema_decay = "score2d", 150, 256, 10, 0.0
    c.model.update(hidden=64, num_layers=2, ode_steps=20)
    full = load("toy2d:gaussians8")
    src = ArraySource({"x": full[np.arange(2048)]["x"]}, full.info)
    model = registry.get("score2d").build(c.model, src.info)
    result = train(model, c, src, show_progress=False)
    assert float(result.metrics["loss"]) < 1.0, result.metrics   # a zero output scores E|eps|^2 = 2
    x = np.asarray(load("toy2d:gaussians8", "test")[np.arange(64)]["x"])
    ev = jax.jit(model.evaluate)(result.state.params, jax.random.key(0), {"x": x, "idx": np.arange(64)})
    np.testing.assert_allclose(ev["true_nll"], -toy2d.log_density("gaussians8", x), rtol=1e-5)
    # the model's exact NLL is a real density: finite, and no better than the truth on average by much
    assert np.all(np.isfinite(ev["nll"])) and float(np.mean(ev["nll"])) > float(np.mean(ev["true_nll"])) - 0.3


def test_points_image_puts_each_point_in_its_cell():
    """`zoo sample score2d` draws its [n, 2] points as a density image: check cells by hand."""
    from zoo.images import points_image

    pts = np.array([[-0.9, -0.9], [0.9, 0.9], [0.9, 0.9], [0.9, 0.9], [0.1, -0.6]])
    img = points_image(pts, size=4, lim=1.0)[0, :, :, 0]
    want = np.zeros((4, 4))
    want[0, 3] = 1.0               # (0.9, 0.9): right column, top row (y up), the densest cell
    want[3, 0] = np.sqrt(1 / 3)    # (-0.9, -0.9): bottom left, one third of the peak count
    want[3, 2] = np.sqrt(1 / 3)    # (0.1, -0.6): x in [0, 0.5), y in [-1, -0.5)
    np.testing.assert_allclose(img, want)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        points_image(np.zeros((3, 3)))
