"""Filling masked spans with a trained `bert`: one pass against one byte per pass (fill_masks).

python experiments/bert_fill.py runs/bert [--spans 1 2 4 8] [--seed 0]

In every held-out window of the run's data (the `test` split: documents never trained on), one
span of k consecutive bytes at a random place (the same places for both decoders) becomes
[MASK]s. "one pass" fills every mask with the argmax of one forward pass (each mask predicted
alone); "fill_masks" is zoo.models.bert.fill_masks, greedy: one byte per pass, the most confident
first, each pass seeing the bytes filled before it. Reports the byte accuracy over the masked bytes
and the share of spans filled exactly; prints a Markdown table and writes WORKDIR/fill.json.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from zoo.models.bert import BERT, bert_config_from, fill_masks
from zoo.train.workdir import build, load_config, restore_params


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--spans", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args(argv)

    config = load_config(args.workdir, "bert")
    model_def, source = build(config, "test")
    params, step = restore_params(args.workdir, config, model_def, source)
    cfg = bert_config_from(config.model)
    windows = np.asarray(source[np.arange(len(source))]["x"])[:, :-1].astype(np.int32)
    N, T = windows.shape
    one_pass = jax.jit(lambda t: jnp.where(t == cfg.mask_id, jnp.argmax(BERT(cfg).apply({"params": params}, t), -1), t))
    iterative = jax.jit(lambda t: fill_masks(cfg, params, jax.random.PRNGKey(0), t))
    rows = []
    for k in args.spans:
        start = np.random.default_rng([args.seed, k]).integers(0, T - k + 1, N)
        masked = (np.arange(T)[None] >= start[:, None]) & (np.arange(T)[None] < (start + k)[:, None])
        inputs = np.where(masked, cfg.mask_id, windows)
        for name, decode in (("one pass", one_pass), ("fill_masks", iterative)):
            t0 = time.perf_counter()
            out = np.concatenate([np.asarray(decode(jnp.asarray(inputs[i:i + args.batch])))
                                  for i in range(0, N, args.batch)])
            right = (out == windows) | ~masked
            rows.append({"span": k, "decoder": name, "byte_accuracy": float(right[masked].mean()),
                         "span_exact": float(right.all(1).mean()), "seconds": time.perf_counter() - t0})
    print(f"bert at step {step}: {N} held-out windows of {T} bytes, one masked span each (seed {args.seed})\n")
    print("| span (bytes) | decoder | byte accuracy | span exact | s (CPU, incl. compile) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['span']} | {r['decoder']} | {100 * r['byte_accuracy']:.1f}% | {100 * r['span_exact']:.1f}% | "
              f"{r['seconds']:.1f} |")
    with open(os.path.join(args.workdir, "fill.json"), "w") as f:
        json.dump({"step": step, "windows": N, "seq_len": T, "seed": args.seed, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
