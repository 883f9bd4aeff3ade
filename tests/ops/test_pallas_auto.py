"""The "auto" implementation of zoo.ops's Pallas-kernel ops (add_layer_norm, logsumexp,
cross_entropy_and_grad, the losses' logsumexp) and GPTConfig's defaults that use it: the XLA
form off an NVIDIA GPU (here: the same program as "xla"), the Triton kernels on one (here with
the device check patched: the kernels in the traced program), and how the device is told."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.ops import _pallas, layer_norm, logsumexp, losses


def _ops(impl):
    """Each op with `impl` on small inputs: {name: (fn, args)}."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((6, 40)), jnp.float32)
    r, d = jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.float32), jnp.asarray(rng.standard_normal((2, 3, 16)))
    g, b = jnp.ones(16), jnp.zeros(16)
    y = jnp.asarray(rng.integers(0, 40, 6), jnp.int32)
    return {
        "add_layer_norm": (lambda r, d: layer_norm.add_layer_norm(r, d, g, b, implementation=impl), (r, d)),
        "logsumexp": (lambda x: logsumexp.logsumexp(x, implementation=impl), (x,)),
        "cross_entropy_and_grad": (lambda x: logsumexp.cross_entropy_and_grad(x, y, implementation=impl), (x,)),
        "cross_entropy": (lambda x: losses.cross_entropy(x, y, logsumexp=impl), (x,)),
        "cross_entropy grad": (jax.grad(lambda x: losses.cross_entropy(x, y, logsumexp=impl).sum()), (x,)),
    }


def _kernels(fn, args):
    return str(jax.make_jaxpr(fn)(*args)).count("pallas_call")


def test_auto_is_the_xla_form_off_a_cuda_gpu():
    assert not _pallas.on_cuda_gpu() and layer_norm.resolved("auto") == "xla"
    for name, (fn, args) in _ops("auto").items():
        xla_fn, _ = _ops("xla")[name]
        assert _kernels(fn, args) == 0, name
        assert str(jax.make_jaxpr(fn)(*args)) == str(jax.make_jaxpr(xla_fn)(*args)), name  # the same program
        for a, b in zip(jax.tree.leaves(fn(*args)), jax.tree.leaves(xla_fn(*args))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_auto_is_the_kernel_on_a_cuda_gpu(monkeypatch):
    monkeypatch.setattr(_pallas, "on_cuda_gpu", lambda: True)
    assert layer_norm.resolved("auto") == "pallas" and layer_norm.resolved(None) == "xla"
    for name, (fn, args) in _ops("auto").items():
        pallas_fn, _ = _ops("pallas")[name]
        assert _kernels(fn, args) == _kernels(pallas_fn, args) > 0, name
        assert str(jax.make_jaxpr(fn)(*args)) == str(jax.make_jaxpr(pallas_fn)(*args)), name


@pytest.mark.parametrize("kind, version, backend, want", [
    ("NVIDIA H200", "cuda 13000", "gpu", True),
    ("NVIDIA H100 80GB HBM3", "", "gpu", True),
    ("Tesla V100", "cuda 12040", "gpu", True),
    ("AMD Instinct MI300X", "rocm 6.2", "gpu", False),
    ("cpu", "", "cpu", False),
])
def test_the_device_is_told_by_backend_kind_and_platform(monkeypatch, kind, version, backend, want):
    device = types.SimpleNamespace(device_kind=kind, client=types.SimpleNamespace(platform_version=version))
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    assert _pallas.on_cuda_gpu() is want


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="add_layer_norm: implementation must be one of xla, pallas, auto or None; "
                                         "got 'fast'"):
        layer_norm.resolved("fast")
    with pytest.raises(ValueError, match="linear_cross_entropy: logsumexp must be one of xla, pallas, auto or None"):
        losses.linear_cross_entropy(jnp.ones((2, 4)), jnp.ones((8, 4)), jnp.zeros(2, jnp.int32), logsumexp="fast")


def test_gpt_defaults_follow_the_device(monkeypatch):
    """GPTConfig's layer_norm and logsumexp default to "auto": here the model is the plain one's
    program (loss and gradients equal to layer_norm="xla", logsumexp="xla" exactly); with the
    device check saying NVIDIA GPU, the same config's step holds the kernels."""
    from zoo.models.gpt import GPTConfig, make_gpt

    cfg = GPTConfig(vocab_size=32, max_len=8, num_layers=2, hidden=16, num_heads=2)
    assert (cfg.layer_norm, cfg.logsumexp) == ("auto", "auto")
    plain = dataclasses.replace(cfg, layer_norm="xla", logsumexp="xla")
    batch = {"x": jnp.asarray(np.random.default_rng(1).integers(0, 32, (2, 9)), jnp.int32),
             "idx": jnp.arange(2, dtype=jnp.int32)}
    params = make_gpt(cfg).init(jax.random.key(0), batch)

    def loss_and_grad(c):
        md = make_gpt(c)
        return jax.value_and_grad(lambda p: md.loss(p, jax.random.key(1), batch)[0])

    got, want = loss_and_grad(cfg)(params), loss_and_grad(plain)(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _kernels(loss_and_grad(cfg), (params,)) == 0
    monkeypatch.setattr(_pallas, "on_cuda_gpu", lambda: True)
    # per layer norm one forward and one backward kernel (2 blocks x 2 + the final one), and the
    # loss's logsumexp; each twice in the program: its Triton and its interpreted form, chosen as
    # it lowers (zoo.ops._pallas.run)
    assert _kernels(loss_and_grad(cfg), (params,)) == 2 * (2 * 5 + 1)
