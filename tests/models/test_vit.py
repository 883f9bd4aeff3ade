"""ViT: patchify against NumPy, what the logits must and must not be invariant to, per-example
training noise, evaluate against a NumPy argmax, training through the loop, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.models  # noqa: F401  (registers the models)
from zoo import registry
from zoo.data import ArraySource, load
from zoo.errors import ConfigError, DataError
from zoo.models.vit import ViT, ViTConfig, make_vit, patchify
from zoo.train.loop import train

SHAPE = (8, 8, 1)
TINY = dict(image_shape=SHAPE, num_classes=10, patch_size=2, width=16, num_layers=1, num_heads=2,
            mlp_ratio=2.0)
INFO = {"kind": "image", "shape": SHAPE, "dtype": "float32", "num_classes": 10, "name": "digits"}


def _batch(b=6, seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return {"x": jnp.asarray(rng.random((b, *shape)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, b), jnp.int32),
            "idx": jnp.arange(b, dtype=jnp.int32)}


def _np_patches(x, p):
    """[B, Y, X, C] -> [B, N, p*p*C] by slicing each patch out and flattening it (row, col, channel)."""
    x = np.asarray(x)
    B, Y, X, _ = x.shape
    return np.stack([x[:, i:i + p, j:j + p, :].reshape(B, -1)
                     for i in range(0, Y, p) for j in range(0, X, p)], axis=1)


def _np_unpatch(patches, p, shape):
    B, (Y, X, C) = patches.shape[0], shape
    out = np.zeros((B, Y, X, C), patches.dtype)
    cells = [(i, j) for i in range(0, Y, p) for j in range(0, X, p)]
    for n, (i, j) in enumerate(cells):
        out[:, i:i + p, j:j + p, :] = patches[:, n].reshape(B, p, p, C)
    return out


def _params(model):
    """Init params plus noise: the head starts at zero (logits 0), which would make every test pass."""
    params = jax.jit(model.init)(jax.random.key(0), _batch(2))
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda a: jnp.asarray(a + 0.3 * rng.standard_normal(a.shape), jnp.float32), params)


@pytest.fixture(scope="module")
def tiny():
    """(model, params, jitted logits) of TINY, shared by the tests that only need a forward pass."""
    model = make_vit(**TINY)
    net = ViT(ViTConfig(**TINY))
    return model, _params(model), jax.jit(lambda params, x: net.apply({"params": params}, x)[0])


@pytest.mark.parametrize("p,shape", [(1, (4, 4, 1)), (2, (8, 8, 1)), (4, (8, 8, 3)), (2, (4, 6, 2))])
def test_patchify_matches_numpy(p, shape):
    x = _batch(3, shape=shape)["x"]
    got = np.asarray(patchify(x, p))
    np.testing.assert_array_equal(got, _np_patches(x, p))
    np.testing.assert_array_equal(_np_unpatch(got, p, shape), np.asarray(x))  # a bijection


@pytest.mark.parametrize("pos_embedding", [True, False])
def test_patch_permutation(pos_embedding, tiny):
    """Without positions the encoder sees a set of patches: permuting them leaves the logits alone.
    With positions the logits must change (else the model could not tell where a stroke is)."""
    _, params, logits = tiny
    if not pos_embedding:  # same weights, no position embedding
        params = {k: v for k, v in params.items() if k != "pos"}
        net = ViT(ViTConfig(**TINY, pos_embedding=False))
        logits = jax.jit(lambda params, x: net.apply({"params": params}, x)[0])
    x = np.asarray(_batch(4)["x"])
    perm = np.random.default_rng(3).permutation(16)
    x_perm = _np_unpatch(_np_patches(x, 2)[:, perm], 2, SHAPE)
    out = np.asarray(logits(params, jnp.asarray(np.concatenate([x, x_perm]))))
    out, out_perm = out[:4], out[4:]
    assert np.abs(out).max() > 0.1
    if pos_embedding:
        assert np.abs(out - out_perm).max() > 1e-2
    else:
        np.testing.assert_allclose(out, out_perm, rtol=1e-4, atol=1e-4)


def test_every_pixel_and_no_other_example_matters(tiny):
    """d logits / d pixel is non-zero for every pixel of the example itself and zero across examples."""
    _, params, logits = tiny
    x = _batch(3)["x"]
    jac = jax.jit(jax.jacrev(lambda x: logits(params, x).sum(-1)))(x)  # [B, B, Y, X, C]
    jac = np.abs(np.asarray(jac)).reshape(3, 3, -1)
    for b in range(3):
        assert (jac[b, b] > 0).all()
        assert np.all(np.delete(jac[b], b, axis=0) == 0)


def test_training_noise_is_per_example(tiny):
    """Shift and dropout come from fold_in(key, idx): halves of a batch give the full batch's loss
    terms (what makes pmap agree with jit), and the key changes them."""
    _, params, _ = tiny
    model = make_vit(**TINY, dropout=0.2, augment_shift=1)
    batch = _batch(8)
    loss = jax.jit(lambda params, key, batch: model.loss(params, key, batch)[0])
    k5, k6 = jax.random.key(5), jax.random.key(6)
    full = float(loss(params, k5, batch))
    halves = [float(loss(params, k5, jax.tree.map(lambda a: a[s], batch))) for s in (slice(0, 4), slice(4, 8))]
    np.testing.assert_allclose(full, np.mean(halves), rtol=1e-5)
    assert abs(full - float(loss(params, k6, batch))) > 1e-4  # the key matters


def test_evaluate_matches_numpy_argmax(tiny):
    """Per-example accuracy = argmax of the logits == label, nll = -log softmax; no key dependence."""
    model, params, logits = tiny
    batch = _batch(64, seed=4)
    out = np.asarray(logits(params, batch["x"]), np.float64)
    label = np.asarray(batch["label"])
    evaluate = jax.jit(model.evaluate)
    ev = evaluate(params, jax.random.key(0), batch)
    np.testing.assert_array_equal(ev["accuracy"], (out.argmax(-1) == label).astype(np.float32))
    np.testing.assert_array_equal(ev["nll"], evaluate(params, jax.random.key(1), batch)["nll"])  # no noise
    assert 0 < ev["accuracy"].mean() < 1  # both outcomes exercised
    log_p = out - out.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    np.testing.assert_allclose(ev["nll"], -log_p[np.arange(64), label], rtol=1e-4)


def test_training_through_the_loop_lowers_loss():
    """30 steps of the shared loop on 64 digits (8 fake devices): the cross-entropy falls from log 10."""
    c = registry.get("vit").config()
    c.name, c.steps, c.batch_size, c.log_every = "vit", 30, 32, 1
    c.optimizer.update(lr=1e-2, warmup_steps=3)
    c.model.update(width=32, num_layers=1, num_heads=2, patch_size=4, augment_shift=0, dropout=0.0)
    full = load("digits")
    src = ArraySource({k: v for k, v in full[np.arange(64)].items() if k != "idx"}, full.info)
    model = registry.get("vit").build(c.model, src.info)
    result = train(model, c, src, show_progress=False)
    assert result.step == 30
    assert float(result.metrics["loss"]) < 0.75 * np.log(10), result.metrics


@pytest.mark.parametrize("bad,match", [
    ({"patch_size": 3}, "not divisible by patch_size 3; valid: 1, 2, 4, 8"),
    ({"patch_size": 0}, "patch_size"),
    ({"width": 30, "num_heads": 4}, "multiple of num_heads"),
    ({"num_layers": 0}, "num_layers"),
    ({"dropout": 1.0}, "dropout"),
    ({"augment_shift": 8}, "augment_shift"),
    ({"image_shape": (64,)}, r"images \[Y, X, C\]"),
    ({"num_classes": 1}, "num_classes"),
])
def test_bad_config(bad, match):
    with pytest.raises(ConfigError, match=match):
        make_vit(**{**TINY, **bad})


def test_registry_config_errors_and_data_errors():
    entry = registry.get("vit")
    cfg = entry.config()
    assert cfg.data.name == "digits" and cfg.optimizer.name == "adamw"
    cfg.model.unlisted = 3
    with pytest.raises(ConfigError, match="patch_size"):
        entry.build(cfg.model, INFO)
    with pytest.raises(ConfigError, match="no labels"):
        entry.build(entry.config().model, {**INFO, "num_classes": None})
    model = entry.build(entry.config().model, INFO)
    assert model.sample is None and getattr(model, "generate", None) is None  # a classifier
    with pytest.raises(DataError, match="8, 8, 1"):
        model.init(jax.random.key(0), _batch(2, shape=(4, 4, 1)))
    with pytest.raises(DataError, match="label"):
        model.init(jax.random.key(0), {"x": jnp.zeros((2, *SHAPE))})


def test_cli_sample_says_no_sampler(tmp_path, capsys):
    from zoo import cli
    from zoo.train.loop import write_config

    c = registry.get("vit").config()
    c.name = "vit"
    write_config(str(tmp_path), c)  # `zoo sample` refuses before it looks for a checkpoint
    assert cli.main(["sample", "vit", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: model 'vit' has no sampler; `zoo eval vit --workdir {tmp_path}` gives its "
                   "held-out metrics"], err
