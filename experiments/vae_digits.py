"""VAE on binarised digits: the full run recorded in experiments/results/vae_digits.md.

zoo train vae --config experiments/vae_digits.py --workdir runs/vae_digits
zoo eval vae --workdir runs/vae_digits            # ELBO and IWAE NLL (k=1000) on the 360 test digits
"""

from zoo import registry


def get_config():
    config = registry.get("vae").config()
    config.steps = 20000           # ~1800 epochs of the 1437 training digits at batch 128
    config.batch_size = 128
    config.optimizer.lr = 1e-3
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 200
    config.ema_decay = 0.999       # sample and evaluate with EMA weights
    config.model.latent_dim = 16
    config.model.hidden = (512, 256)
    config.model.eval_k = 1000
    config.ckpt_every = 2000
    config.log_every = 100
    return config
