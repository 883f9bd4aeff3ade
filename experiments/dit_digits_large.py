"""A larger, longer class-conditional DiT on the digits (width 128, depth 6, 8,000 steps): the
second DiT row of experiments/results/ddpm_digits.md.

zoo train dit --config experiments/dit_digits_large.py --workdir runs/dit_digits_large
python experiments/diffusion_fd.py dit runs/dit_digits_large --samplers ddim:50 dpm_solver:20
"""

from zoo import registry


def get_config():
    c = registry.get("dit").config()
    c.steps = 8000                 # twice the ddpm run's ~180 epochs at batch 64
    c.model.num_classes = 10
    c.model.width = 128
    c.model.depth = 6
    return c
