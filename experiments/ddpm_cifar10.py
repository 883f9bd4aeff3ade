"""The DDPM CIFAR-10 model of Ho et al. 2020 (App. B): the 35.7M-parameter UNet (diffusers'
`UNet2DModel` with the same settings has exactly this structure and count: 35,746,307),
T = 1000 linear betas 1e-4..0.02, dropout 0.1, Adam 2e-4 with 5,000 warmup steps, batch 128,
EMA 0.9999, 800k steps, grad clip 1. A GPU run (tensorflow-datasets' cifar10 must be prepared):

zoo train ddpm --config experiments/ddpm_cifar10.py --workdir runs/ddpm_cifar10
zoo sample ddpm --workdir runs/ddpm_cifar10 --sampler ddim --steps 50
"""

from zoo import registry


def get_config():
    c = registry.get("ddpm").config()
    c.data.name = "tfds:cifar10"
    c.batch_size = 128
    c.steps = 800_000
    c.optimizer.lr = 2e-4
    c.optimizer.warmup_steps = 5000
    c.optimizer.grad_clip = 1.0
    c.ema_decay = 0.9999
    c.ckpt_every = 10_000
    c.log_every = 100
    c.model.update(
        block_out_channels=(128, 256, 256, 256),   # 32x32, 16x16, 8x8, 4x4
        layers_per_block=2,
        attention_levels=(False, True, False, False),  # self-attention at 16x16 only
        attention_head_dim=8,
        norm_num_groups=32,
        dropout=0.1,
        sampler="ddpm",
    )
    return c
