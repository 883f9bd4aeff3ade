"""Loop overhead: steps/s of `zoo.train.train` vs a bare jitted step on the same model and batch.

The bare step is the loop's own step function, jitted with the same shardings, called back to back
on one device-resident batch with no data loading, no host transfer, no metric reads and no
checkpoints: the ceiling the loop can approach. On a CPU the host's per-step work (gathering the
batch, the transfer, the one metrics sync) runs on the same cores as the step itself, so it shows
in full; on an accelerator it overlaps with the running step. Goal: overhead = 1 - loop/bare <= 5%.
"""

from __future__ import annotations

import statistics
import time

import jax

from zoo import registry
from zoo.train.loop import keys, train
from zoo.train.strategy import JitStrategy
from zoo.train.state import make_optimizer
from zoo.train.workdir import build


def _config(name: str, batch_size: int, steps: int):
    config = registry.get(name).config()
    config.name = name
    config.batch_size = batch_size
    config.steps = steps
    config.log_every = steps
    return config


def bare_steps_per_sec(config, steps: int) -> float:
    model_def, source = build(config)
    tx = make_optimizer(config.optimizer, int(config.steps))
    strategy = JitStrategy(model_def, tx, float(config.ema_decay))
    from zoo.data import Loader

    init_key, step_key = keys(int(config.seed))
    local = Loader(source, int(config.batch_size), int(config.seed)).batch(0)
    batch = jax.device_put(local, jax.sharding.NamedSharding(strategy.mesh, jax.sharding.PartitionSpec("data")))
    state = strategy.init(init_key, batch)
    for _ in range(3):  # compile + warm up
        state, metrics = strategy.step(state, step_key, batch)
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = strategy.step(state, step_key, batch)
    jax.block_until_ready((state, metrics))
    return steps / (time.perf_counter() - t)


def loop_steps_per_sec(config) -> float:
    model_def, source = build(config)
    return train(model_def, config, source, workdir=None, show_progress=False).steps_per_sec


def run(quick: bool) -> list[dict]:
    cases = [("vae", 128, 300), ("vae", 1024, 100)] if quick else [("vae", 128, 2000), ("vae", 4096, 500)]
    repeats = 5
    rows = []
    for name, batch_size, steps in cases:
        config = _config(name, batch_size, steps + 2)
        case = f"{name}-{config.data.name}-B{batch_size}"
        bares, loops = [], []
        for _ in range(repeats):  # interleaved, so drifts in machine load hit both alike
            bares.append(bare_steps_per_sec(config, steps))
            loops.append(loop_steps_per_sec(config))
        bare, loop = statistics.median(bares), statistics.median(loops)
        rows += [
            {"case": case, "impl": "zoo-bare-jit-step", "value": bare, "unit": "steps/s"},
            {"case": case, "impl": "zoo-loop", "value": loop, "unit": "steps/s",
             "overhead_pct": 100.0 * (1.0 - loop / bare)},
        ]
    return rows
