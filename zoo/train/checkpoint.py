"""Orbax checkpoints: the TrainState plus a JSON record (config, data position) under one step.

Saving is asynchronous (the device-to-host copy blocks, the write does not). Restoring tries the
newest step first; a corrupt or partial one is reported and the next older one is tried, so a run
killed mid-write, or a damaged file, loses at most `ckpt_every` steps.

In a single process, each array is written from one of its copies. Orbax's default (outside
JAX_PLATFORMS=cuda) is "replica-parallel" saving, meant for several hosts sharing the writes of a
replicated array: it cuts every replicated array into one slice per device, each an eager
`jax.jit(slice)` of its own shape. With 8 devices that made the first save of the DDPM test's UNet
compile 192 slice programs: 13 s of a 45 s run, for no gain, since one process writes every
slice anyway. With several processes, orbax's default stays.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from zoo.errors import ZooError

log = logging.getLogger("zoo")


def _type_handlers(replica_parallel: bool):
    """Orbax's type handlers for a state's leaves; jax.Arrays written replica-parallel or not."""
    th = ocp.type_handlers
    kinds = (int, float, bytes, np.number, np.ndarray, str, type(getattr(ocp, "PLACEHOLDER", None)))
    pairs = [(t, th.get_type_handler(t)) for t in kinds if th.has_type_handler(t)]  # orbax's own
    array = th.get_type_handler(jax.Array)
    if not replica_parallel:
        try:  # the per-array metadata orbax's own handler records
            from orbax.checkpoint._src.metadata.array_metadata_store import Store
            store = Store()
        except ImportError:  # pragma: no cover - a later orbax moved it: save without that record
            store = None
        array = th.ArrayHandler(use_replica_parallel=False, array_metadata_store=store)
    return th.create_type_handler_registry(*pairs, (jax.Array, array))


def _handlers() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The manager's two items: "state" (a pytree of arrays), "meta" (JSON)."""
    state = ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers(jax.process_count() > 1))
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args in (ocp.args.PyTreeSave, ocp.args.PyTreeRestore):
        registry.add("state", args, state)
    for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
        registry.add("meta", args, ocp.JsonCheckpointHandler())
    return registry


def _first_line(e: BaseException) -> str:
    """An orbax error's gist: the first line of its root cause (which names the array and the
    file: orbax's own wrapper names only an index), without TensorStore's spec dump."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: " + re.sub(r"\s*See full TensorStore details:.*", "", line)[:300]


def _orbax_leftover(unraisable) -> bool:
    """A read coroutine of orbax's that failed after the restore had already raised.

    When one array of a damaged checkpoint fails to read, orbax's restore raises, and its other
    reads (coroutines still pending) fail later, when they are collected, each printing its
    TensorStore spec ("Exception ignored in: <coroutine ...>", ~60 lines each) or "Event loop is
    closed". The restore's own error has already been reported; those say nothing more.
    """
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
        return True
    # a read that finished after orbax had closed its event loop: TensorStore's callback
    # schedules the result on the closed loop
    return unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"


class _DropUnretrieved(logging.Filter):
    """asyncio's "Future exception was never retrieved" records: the same leftovers, as asyncio
    reports them when the future, not the coroutine, is collected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in str(record.msg)


# the unraisable hook is installed / drops leftovers now / a restore in this process has failed
_leftovers = {"hook": False, "drop": False, "failed": False}


def _drop_leftover_unraisables(on: bool) -> None:
    """Drop (True) or print again (False) the unraisable errors _orbax_leftover recognises.

    Turned on before every restore and off after one succeeds if none failed in this process: a
    failed read's siblings can fail while orbax is still raising, before the caller's except
    clause runs (seen on Python 3.12), so the filter has to be in place first.
    """
    _leftovers["drop"] = on
    if _leftovers["hook"]:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (_leftovers["drop"] and _orbax_leftover(unraisable)):
            previous(unraisable)

    sys.unraisablehook = hook
    _leftovers["hook"] = True


def _quiet_orbax_leftovers() -> None:
    """After a failed restore: drop the leftovers of its reads (see _orbax_leftover) from here on.

    Every other unraisable error is printed as before; asyncio's logger loses only its "exception
    was never retrieved" records and Python only its "coroutine ... was never awaited" warnings,
    which in this process now come from the failed restore.
    """
    _leftovers["failed"] = True
    _drop_leftover_unraisables(True)
    # the reads orbax never awaited once one had failed
    warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropUnretrieved) for f in asyncio_log.filters):
        asyncio_log.addFilter(_DropUnretrieved())


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=_handlers())

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, abstract_state, step: int | None = None):
        """-> (state, meta, step) from the newest readable checkpoint, or None when there is none.

        With `step`, restore exactly that one (an error if it is unreadable).
        """
        steps = self.steps()
        if step is not None:
            if step not in steps:
                raise ZooError(f"no checkpoint at step {step} in {self.directory}; have: {steps}")
            steps = [step]
        errors = []
        for s in reversed(steps):
            _drop_leftover_unraisables(True)
            try:
                restore = ocp.args.PyTreeRestore(abstract_state,
                                                 restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
                out = self.manager.restore(s, args=ocp.args.Composite(state=restore, meta=ocp.args.JsonRestore()))
                _drop_leftover_unraisables(_leftovers["failed"])  # a clean restore leaves nothing over
                if errors:
                    moved = self._set_aside([t for t in steps if t > s])
                    print(f"warning: {errors[-1]}; resumed from step {s} instead (moved the unreadable "
                          f"checkpoints to {moved})", file=sys.stderr)
                return out.state, out.meta, s
            except Exception as e:  # orbax raises many types for damaged files
                _quiet_orbax_leftovers()
                errors.append(f"checkpoint at step {s} in {self.directory} is corrupt or partial "
                              f"({_first_line(e)})")
        if errors:
            raise ZooError("; ".join(errors) + "; no readable checkpoint left (nothing was deleted; to "
                           f"start afresh, move {self.directory} away)")
        return None

    def _set_aside(self, steps: list[int]) -> str:
        """Move unreadable checkpoints out of the way (kept, not deleted) so their steps can be redone."""
        import jax

        target = self.directory + "-unreadable"
        if jax.process_index() == 0:
            os.makedirs(target, exist_ok=True)
            for t in steps:
                dest = os.path.join(target, f"{t}-{int(time.time())}")
                shutil.move(os.path.join(self.directory, str(t)), dest)
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
