"""Frechet distance of a trained digits diffusion model's samples, per sampler, beside the floor.

python experiments/diffusion_fd.py ddpm runs/ddpm_digits [--n 360] [--seeds 0 1] [--samplers ddpm ddim:50 dpm_solver:20]

Samples n digits per seed (labels 0..9 in turn when the model is class-conditional, no guidance),
and scores them with zoo.eval.frechet.digits_fd on the features of the small classifier cached in
the workdir, against two references:
- the 1,437 train digits; floor: the 360 held-out test digits (another set of writers) score 2.04,
  so a sampler that copies training digits can score below the floor;
- the 360 held-out test digits; floor: 360 train digits drawn at random (mean of 5 draws): what a
  sampler of the training distribution scores, memorising or not.
Prints a Markdown table and writes WORKDIR/fd.json.
"""

import argparse
import json
import os
import time

import jax
import numpy as np

from zoo.data import load
from zoo.eval.frechet import digits_fd, digits_fd_floor
from zoo.train.workdir import build, load_config, restore_params


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("workdir")
    p.add_argument("--n", type=int, default=360)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--samplers", nargs="+", default=["ddpm", "ddim:50", "dpm_solver:20"])
    p.add_argument("--guidance", type=float, default=None)
    args = p.parse_args(argv)

    config = load_config(args.workdir, args.name)
    model_def, source = build(config)
    params, step = restore_params(args.workdir, config, model_def, source)
    train_x = np.asarray(load("digits", "train")[np.arange(len(load("digits", "train")))]["x"])
    test_floor = [digits_fd(train_x[np.random.default_rng(s).choice(len(train_x), args.n, replace=False)],
                            args.workdir, reference="test") for s in range(5)]
    rows = [{"sampler": "floor (test digits vs train; 360 train digits vs test)",
             "fd_train": [digits_fd_floor(args.workdir)], "fd_test": test_floor, "seconds": 0.0}]
    for spec in args.samplers:
        sampler, _, steps = spec.partition(":")
        fd_train, fd_test, t0 = [], [], time.perf_counter()
        for seed in args.seeds:
            req = {"n": args.n, "sampler": sampler, "steps": int(steps) if steps else None, "guidance": args.guidance}
            images = np.asarray(model_def.generate(params, jax.random.PRNGKey(seed), req)["images"]["samples"])
            fd_train.append(digits_fd(images, args.workdir))
            fd_test.append(digits_fd(images, args.workdir, reference="test"))
        rows.append({"sampler": spec, "fd_train": fd_train, "fd_test": fd_test,
                     "seconds": (time.perf_counter() - t0) / len(args.seeds)})
    print(f"{args.name} at step {step}, n = {args.n}, seeds {args.seeds}, guidance {args.guidance or 1.0}\n")
    print("| sampler | FD to train (per seed) | FD to test (per seed) | s per run (CPU, incl. compile) |\n"
          "|---|---|---|---|")
    fmt = lambda v: f"{np.mean(v):.2f} ({', '.join(f'{x:.2f}' for x in v)})"
    for r in rows:
        print(f"| {r['sampler']} | {fmt(r['fd_train'])} | {fmt(r['fd_test'])} | {r['seconds']:.0f} |")
    with open(os.path.join(args.workdir, "fd.json"), "w") as f:
        json.dump({"model": args.name, "step": step, "n": args.n, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
