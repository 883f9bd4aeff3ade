"""zoo.train.checkpoint.Checkpointer on 8 devices: no per-device slice programs when one process
saves, values and shardings restored, and orbax's standard layout both ways (workdirs written
before the change restore, and orbax's own StandardRestore reads the new ones)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from zoo.train.checkpoint import Checkpointer


def _state():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(0)
    # replicated arrays of several shapes (each would have been cut 8 ways, one program per shape),
    # one split over the devices, and a replicated scalar
    state = {f"w{i}": jax.device_put(jnp.asarray(rng.standard_normal((8 * (i + 1), 3 + i)), jnp.float32), rep)
             for i in range(5)}
    state["b"] = jax.device_put(jnp.arange(32.0), split)
    state["step"] = jax.device_put(jnp.int32(7), rep)
    return state


def _abstract(state):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def _assert_same(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
        assert got[k].sharding == want[k].sharding, k


def _assert_restores(ckpt, state, step, meta):
    """ckpt's newest checkpoint is `step`, with `meta` and `state` (values and shardings)."""
    got, got_meta, got_step = ckpt.restore(_abstract(state))
    ckpt.close()
    assert got_step == step and got_meta == meta
    _assert_same(got, state)


def test_single_process_save_compiles_no_slices(tmp_path, caplog):
    assert jax.device_count() == 8
    state = _state()
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            ckpt = Checkpointer(str(tmp_path / "ck"))
            ckpt.save(3, state, {"data_position": 12})
            ckpt.wait()
    finally:
        jax.config.update("jax_log_compiles", False)
    compiled = [r.getMessage().splitlines()[0] for r in caplog.records if "compil" in r.getMessage().lower()]
    assert not [m for m in compiled if "slice" in m], compiled
    _assert_restores(ckpt, state, 3, {"data_position": 12})


def test_restores_checkpoints_written_with_orbax_standard_handler(tmp_path):
    """Workdirs from before the change: orbax's StandardSave, items named "state" and "meta"."""
    state = _state()
    old = ocp.CheckpointManager(str(tmp_path), options=ocp.CheckpointManagerOptions(create=True),
                                item_names=("state", "meta"))
    old.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"a": 1})))
    old.wait_until_finished()
    old.close()
    _assert_restores(Checkpointer(str(tmp_path)), state, 5, {"a": 1})


def test_orbax_standard_restore_reads_what_it_writes(tmp_path):
    state = _state()
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(2, state, {"b": 2})
    ckpt.close()
    reader = ocp.CheckpointManager(str(tmp_path), item_names=("state", "meta"))
    out = reader.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(state)),
                                                    meta=ocp.args.JsonRestore()))
    reader.close()
    assert out.meta == {"b": 2}
    _assert_same(dict(out.state), state)
