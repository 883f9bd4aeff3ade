"""zoo.ops's Pallas kernels (layer norm, logsumexp, cross_entropy_and_grad) under jit over a mesh of the 8 fake CPU
devices, rows sharded: each device runs the kernel on its own rows (no all-gather of the inputs,
the scale and bias gradients summed across devices by one all-reduce) and the values and
gradients equal the one-device run's (which the other tests check against NumPy)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zoo.ops.layer_norm import add_layer_norm
from zoo.ops.losses import cross_entropy


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
    return Mesh(np.array(jax.devices()[:8]), ("data",))


def _collectives(compiled):
    """[(elements per output array, kind)] of each collective in the compiled program."""
    found = re.findall(r"= (\(?[\w\[\]{}, ]+?\)?) (all-gather|all-reduce|all-to-all|collective-permute)(?:-start)?\(",
                       compiled.as_text())
    return [([int(np.prod([int(n) for n in dims.split(",") if n] or [1])) for dims in re.findall(r"\[([\d,]*)\]", shape)],
             kind) for shape, kind in found]


def test_layer_norm_runs_per_shard_of_rows(mesh):
    rng = np.random.default_rng(0)
    B, T, H = 16, 5, 24
    r, d, ch = (jnp.asarray(rng.standard_normal((B, T, H)), jnp.float32) for _ in range(3))
    cys = tuple(jnp.asarray(rng.standard_normal((B, T, H)), jnp.float32) for _ in range(3))
    g, b = jnp.asarray(rng.standard_normal(H), jnp.float32), jnp.asarray(rng.standard_normal(H), jnp.float32)

    def f(r, d, g, b, ch, cys):
        (h, ys), vjp = jax.vjp(lambda r, d, g, b: add_layer_norm(r, d, g, b, implementation="pallas", copies=3),
                               r, d, g, b)
        return h, ys[0], vjp((ch, cys))

    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    args = (r, d, g, b, ch, cys)
    sharded = jax.jit(f, in_shardings=(rows, rows, rep, rep, rows, (rows,) * 3))
    got, want = sharded(*args), jax.jit(f)(*args)
    for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-5)
    assert got[0].sharding.spec[0] == "data"  # h stays sharded by rows
    collectives = _collectives(sharded.lower(*args).compile())
    # the scale and bias gradients: one all-reduce of [H]-sized sums (XLA may combine the two)
    assert collectives and all(kind == "all-reduce" and max(sizes) == H for sizes, kind in collectives), collectives


def test_logsumexp_runs_per_shard_of_rows(mesh):
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((16, 3, 70)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 70, (16, 3)), jnp.int32)
    f = jax.value_and_grad(lambda z, y: cross_entropy(z, y, logsumexp="pallas").mean())
    rows = NamedSharding(mesh, P("data"))
    sharded = jax.jit(f, in_shardings=(rows, rows))
    (loss, grad), (want_loss, want_grad) = sharded(logits, labels), jax.jit(f)(logits, labels)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-6, atol=1e-7)
    assert grad.sharding.spec[0] == "data"
    collectives = _collectives(sharded.lower(logits, labels).compile())
    assert [kind for _, kind in collectives] == ["all-reduce"], collectives  # the mean's sum only


def test_linear_cross_entropy_runs_per_shard_of_rows(mesh):
    """The output layer and loss as one op (its kernel writes d = softmax - onehot per shard of
    rows), value and gradients as on one device; the only collectives are all-reduces (the loss's
    sum, the [V, H] table's gradient)."""
    from zoo.ops.losses import linear_cross_entropy

    rng = np.random.default_rng(5)
    h = jnp.asarray(rng.standard_normal((16, 3, 12)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((70, 12)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 70, (16, 3)), jnp.int32)
    f = jax.value_and_grad(lambda h, w, y: linear_cross_entropy(h, w, y, logsumexp="pallas").mean(), (0, 1))
    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    sharded = jax.jit(f, in_shardings=(rows, rep, rows))
    (loss, grads), (want_loss, want_grads) = sharded(h, w, labels), jax.jit(f)(h, w, labels)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    for a, c in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)
    assert grads[0].sharding.spec[0] == "data"
    collectives = _collectives(sharded.lower(h, w, labels).compile())
    assert collectives and all(kind == "all-reduce" for _, kind in collectives), collectives


def test_rows_that_do_not_split_evenly_are_still_right(mesh):
    """12 rows over 8 devices: the kernel's shard would be uneven, so each device takes all rows
    (gathered) rather than padded ones; the values are the same."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((12, 40)), jnp.float32)
    g, b = jnp.ones(40), jnp.zeros(40)
    rows = NamedSharding(mesh, P("data"))  # uneven: JAX allows it only inside a program
    f = jax.jit(lambda x: add_layer_norm(jax.lax.with_sharding_constraint(x, rows), None, g, b,
                                         implementation="pallas")[1])
    np.testing.assert_allclose(np.asarray(f(x)), np.asarray(add_layer_norm(x, None, g, b)[1]), rtol=1e-5, atol=1e-5)
    assert "all-gather" in [kind for _, kind in _collectives(f.lower(x).compile())]


@pytest.mark.parametrize("xent", ["logits", "fused"])
def test_gpt_with_pallas_kernels_on_eight_devices_equals_one(mesh, xent):
    """GPT with the Pallas kernels (and separate q/k/v: ln_1's three copies; the loss on the
    logits, or with the output layer inside: cross_entropy_and_grad's kernel), its loss and
    gradients under jit with the batch sharded over the 8 devices, as on one; no activation is
    gathered (the only collectives are all-reduces of sums: the loss, the params' gradients)."""
    import dataclasses

    from zoo.models.gpt import GPTConfig, make_gpt

    cfg = GPTConfig(vocab_size=32, max_len=8, num_layers=2, hidden=16, num_heads=2, qkv="separate",
                    layer_norm="pallas", logsumexp="pallas", xent=xent)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 32, (8, 9)), jnp.int32)
    batch = {"x": tokens, "idx": jnp.arange(8, dtype=jnp.int32)}
    md = make_gpt(cfg)
    params = md.init(jax.random.key(0), batch)
    f = jax.value_and_grad(lambda p, batch: md.loss(p, jax.random.key(1), batch)[0])
    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    sharded = jax.jit(f, in_shardings=(rep, rows))
    (loss, grads), (want, want_grads) = sharded(params, batch), jax.jit(f)(params, batch)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    for a, c in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-6)
    assert all(kind == "all-reduce" for _, kind in _collectives(sharded.lower(params, batch).compile()))
    plain = make_gpt(dataclasses.replace(cfg, layer_norm="xla", logsumexp="xla", xent="logits"))
    np.testing.assert_allclose(float(jax.jit(lambda p: plain.loss(p, jax.random.key(1), batch)[0])(params)),
                               float(want), rtol=1e-6)


def test_the_kernels_batch_under_vmap():
    """jax.vmap over the Pallas ops (custom_partitioning has no batching rule: by_rows batches the
    kernels as Pallas does), values and gradients as the "xla" forms', a batched scale included."""
    from zoo.ops.logsumexp import cross_entropy_and_grad, logsumexp

    rng = np.random.default_rng(4)
    y = jnp.asarray(rng.integers(0, 16, (3, 5)), jnp.int32)
    x = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(16), jnp.float32)
    for impl in ("pallas", "xla"):
        ln = jax.vmap(lambda r, g, impl=impl: add_layer_norm(r, r * 0.5, g, b, implementation=impl)[1])
        grad = jax.vmap(jax.grad(lambda r, g, impl=impl: jnp.sum(jnp.sin(add_layer_norm(r, None, g, b, implementation=impl)[1]))))
        lse = jax.vmap(jax.value_and_grad(lambda z, impl=impl: jnp.sum(jnp.cos(logsumexp(z, implementation=impl)))))
        xent = jax.vmap(lambda z, y, impl=impl: cross_entropy_and_grad(z, y, implementation=impl))
        if impl == "pallas":
            got = (ln(x, g), grad(x, g), lse(x), xent(x, y))
        else:
            want = (ln(x, g), grad(x, g), lse(x), xent(x, y))
    for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-5)
