"""`zoo eval`: a trained model's held-out metrics, averaged over the test split."""

from __future__ import annotations

import jax
import numpy as np

from zoo.data import eval_batches
from zoo import xla
from zoo.errors import ZooError
from zoo.train.metrics import progress


def evaluate(model_def, params, source, *, batch_size: int, seed: int = 0, max_examples: int = 0,
             show_progress: bool = False) -> dict:
    """Mean of each per-example metric of `model_def.evaluate` over `source` (in order).

    `show_progress`: a bar of examples done on stderr when it is a terminal (some bounds, AIS or
    the probability-flow ODE's likelihood, take minutes).
    """
    if model_def.evaluate is None:
        raise ZooError("this model defines no held-out metrics")
    fn = xla.jit(model_def.evaluate)
    key = jax.random.PRNGKey(seed)
    sums, n = {}, 0
    total = min(len(source), max_examples) if max_examples else len(source)
    with progress(total, 0, show_progress, unit="example") as bar:
        for batch in eval_batches(source, batch_size):
            if max_examples and n >= max_examples:
                break
            if max_examples:
                batch = {k: v[: max_examples - n] for k, v in batch.items()}
            # per-example keys fold the idx, so give every example a distinct global index
            batch = dict(batch, idx=np.arange(n, n + len(batch["idx"]), dtype=np.int32))
            out = jax.device_get(fn(params, key, batch))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(np.sum(np.asarray(v, np.float64)))
            n += len(batch["idx"])
            bar.update(len(batch["idx"]))
    out = {"examples": n, **{k: v / n for k, v in sums.items()}}
    if "neg_bound" in out and "words" in out:  # topic models: per-word perplexity over the split
        out["perplexity"] = float(np.exp(sums["neg_bound"] / sums["words"]))
    return out


def evaluate_workdir(name: str, workdir: str, *, seed: int = 0, overrides=(), show_progress: bool = False) -> dict:
    from zoo.train.overrides import apply_overrides
    from zoo.train.workdir import build, load_config, restore_params

    config = apply_overrides(load_config(workdir, name), list(overrides))
    model_def, test = build(config, "test")
    params, step = restore_params(workdir, config, model_def, test)
    out = evaluate(model_def, params, test, batch_size=int(config.eval.batch_size), seed=seed,
                   max_examples=int(config.eval.max_examples), show_progress=show_progress)
    return {"model": name, "step": step, **out}
