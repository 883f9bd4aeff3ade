"""Small configs and runners shared by the loop tests."""

import numpy as np

from zoo import registry
from zoo.train.loop import train
from zoo.train.metrics import read_metrics
from zoo.train.workdir import build


def tiny_vae_config(**overrides):
    """A VAE small enough that a 60-step run takes about a second."""
    config = registry.get("vae").config()
    config.name = "vae"
    config.batch_size = 32
    config.steps = 12
    config.log_every = 1
    config.ckpt_every = 1000
    config.model.hidden = (32,)
    config.model.latent_dim = 4
    config.model.eval_k = 8
    config.fsdp_min_size = 64
    for k, v in overrides.items():
        node = config
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return config


def run(config, workdir=None, devices=None):
    model_def, source = build(config)
    return train(model_def, config, source, workdir=str(workdir) if workdir else None,
                 show_progress=False, devices=devices)


def losses(workdir) -> np.ndarray:
    return np.array([m["loss"] for m in read_metrics(f"{workdir}/metrics.jsonl")])


def flat(tree) -> np.ndarray:
    import jax

    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])
