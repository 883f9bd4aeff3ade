"""The one training loop: every model in the zoo trains through `train`.

Per step: the loader gives this process its slice of the global batch for step s (a pure function
of seed and s, so resume is exact), the jitted step folds s into the key, updates the state
(donated) and returns scalar metrics. Step s's metrics are read after step s+1 is dispatched;
that read is the loop's one sync per step (on 2-core CPU hosts, ~100 queued collective steps
without a sync can deadlock). Checkpoints: every `ckpt_every` steps, at the end, on SIGTERM.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time

import jax
import ml_collections

from zoo.data import Loader, Source
from zoo.errors import ConfigError
from zoo.models.base import ModelDef
from zoo.train import sharding
from zoo.train.checkpoint import Checkpointer
from zoo.train.metrics import MetricsWriter, is_finite, progress
from zoo.train.state import make_optimizer
from zoo.train.strategy import host_metrics, make_strategy


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int):
        super().__init__(f"non-finite loss at step {step}")
        self.step = step


@dataclasses.dataclass
class TrainResult:
    state: object            # canonical (unreplicated) TrainState
    step: int                # steps done
    metrics: dict            # last step's metrics
    steps_per_sec: float     # after the first two (compiling) steps; nan if too few
    preempted: bool = False  # stopped by SIGTERM or Ctrl-C after saving
    signal: int | None = None  # which of the two stopped it


def keys(seed: int):
    """(init key, step key): the step key is folded with the step number inside the step."""
    init_key, step_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, step_key


class _Stop:
    """Turns SIGTERM, and Ctrl-C (SIGINT), into a flag the loop checks once per step (main thread
    only): the loop saves a checkpoint and returns. A second Ctrl-C raises KeyboardInterrupt at
    once, without saving (the last checkpoint stays). A SIGINT that the process was started
    ignoring (a background job) stays ignored."""

    def __init__(self):
        self.signum, self.old = None, {}

    @property
    def hit(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self.old[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signum = signum
        if signum == signal.SIGINT:
            print("\ninterrupted: saving a checkpoint after this step (Ctrl-C again quits without it)",
                  file=sys.stderr)

    def __exit__(self, *_):
        for signum, old in self.old.items():
            signal.signal(signum, old)


def check_same_run(workdir: str, config: ml_collections.ConfigDict) -> None:
    """A workdir holds one run: refuse to resume it with another model, model config or data."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    new = json.loads(config.to_json_best_effort())
    for key in ("name", "model", "data"):
        old_value, new_value = saved.get(key), new.get(key)
        if old_value == new_value:
            continue
        if isinstance(old_value, dict) and isinstance(new_value, dict):
            diffs = [f"{key}.{k}: {old_value.get(k, '(unset)')!r} there, {new_value.get(k, '(unset)')!r} now"
                     for k in sorted(set(old_value) | set(new_value)) if old_value.get(k) != new_value.get(k)]
        else:
            diffs = [f"{key}: {old_value!r} there, {new_value!r} now"]
        raise ConfigError(f"{workdir} holds another run ({'; '.join(diffs)}); resume it with its own "
                          f"settings or use a new --workdir")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir} is a file, not a directory")
    check_same_run(workdir, config)
    if jax.process_index() == 0:
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create workdir {workdir}: {e.strerror or e}") from e
        path = os.path.join(workdir, "config.json")
        with open(path + ".tmp", "w") as f:  # atomic: other processes may be reading it
            f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
        os.replace(path + ".tmp", path)


def _validate(config) -> None:
    for name in ("steps", "batch_size", "log_every", "ckpt_every"):
        if int(config[name]) <= 0:
            raise ConfigError(f"{name} must be > 0, got {config[name]}")
    if not 0.0 <= float(config.ema_decay) < 1.0:
        raise ConfigError(f"ema_decay must be in [0, 1), got {config.ema_decay}")
    if not 0 <= int(config.seed) < 2**32:  # numpy's and jax.random's seeds
        raise ConfigError(f"seed must be in [0, 2**32), got {config.seed}")
    if int(config.get("keep_checkpoints", 1)) < 1:
        raise ConfigError(f"keep_checkpoints must be >= 1, got {config.keep_checkpoints}")
    if "eval" in config and int(config.eval.get("batch_size", 1)) < 1:
        raise ConfigError(f"eval.batch_size must be >= 1, got {config.eval.batch_size}")
    if int(config.get("fsdp_min_size", 0)) < 0:
        raise ConfigError(f"fsdp_min_size must be >= 0, got {config.fsdp_min_size}")
    sharding.check_batch_size(int(config.batch_size))


def train(model_def: ModelDef, config: ml_collections.ConfigDict, data: Source, *,
          workdir: str | None = None, show_progress: bool = True, devices=None) -> TrainResult:
    """Train `model_def` on `data` (a train-split Source) as `config` says; resume from workdir."""
    _validate(config)
    total = int(config.steps)
    tx = make_optimizer(config.optimizer, total, model_def.trainable)
    strategy = make_strategy(config.parallel, model_def, tx, float(config.ema_decay),
                             min_size=int(config.fsdp_min_size), devices=devices)
    loader = Loader(data, int(config.batch_size), int(config.seed),
                    jax.process_index(), jax.process_count(), shuffle=bool(config.data.get("shuffle", True)))
    init_key, step_key = keys(int(config.seed))
    first = strategy.put_batch(loader.batch(0))

    ckpt, state, start = None, None, 0
    if workdir is not None:
        write_config(workdir, config)
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(config.keep_checkpoints))
        restored = ckpt.restore(strategy.abstract_state(init_key, first))
        if restored is not None:
            state, _, start = restored
            state = strategy.place(state)
            if start >= total and jax.process_index() == 0:
                print(f"note: {workdir} is at step {start}, not below steps={total}: nothing to train "
                      f"(a larger --steps continues it)", file=sys.stderr)
    if state is None:
        state = strategy.init(init_key, first)
    writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl") if workdir else None, start,
                           enabled=jax.process_index() == 0)
    try:
        return _run(strategy, state, step_key, loader, config, ckpt, writer, start, total,
                    show_progress)
    finally:
        writer.close()
        if ckpt is not None:
            ckpt.close()


def _run(strategy, state, step_key, loader, config, ckpt, writer, start, total, show_progress):
    log_every, ckpt_every = int(config.log_every), int(config.ckpt_every)
    bar = progress(total, start, show_progress and jax.process_index() == 0)
    last, pending, t0, t0_step = {}, None, None, None

    def consume(done: int, metrics) -> dict:
        host = host_metrics(metrics)
        if not is_finite(host["loss"]):
            raise NonFiniteLoss(done)
        if done % log_every == 0 or done == total:
            writer.write(done, host)
            bar.set_postfix(loss=f"{host['loss']:.4g}", refresh=False)
        bar.update(1)
        return host

    def save(done: int, state) -> None:
        if ckpt is not None:
            ckpt.save(done, strategy.canonical(state),
                      {"step": done, "data_position": done * int(config.batch_size),
                       "seed": int(config.seed)})

    with _Stop() as stop:
        for s in range(start, total):
            state, metrics = strategy.step(state, step_key, strategy.put_batch(loader.batch(s)))
            if pending is not None:
                last = consume(*pending)
            pending = (s + 1, metrics)
            if s + 1 == start + 2:
                t0, t0_step = time.perf_counter(), s + 1
            if (s + 1) % ckpt_every == 0 or s + 1 == total or stop.hit:
                last, pending = consume(*pending), None
                save(s + 1, state)
            if stop.hit:
                bar.close()
                return TrainResult(strategy.canonical(state), s + 1, last, float("nan"), True, stop.signum)
        if pending is not None:
            last = consume(*pending)
    bar.close()
    done = max(total, start)
    rate = (done - t0_step) / (time.perf_counter() - t0) if t0 and done > t0_step else float("nan")
    return TrainResult(strategy.canonical(state), done, last, rate)


def load_config_json(workdir: str) -> dict:
    with open(os.path.join(workdir, "config.json")) as f:
        return json.load(f)
