"""Class-conditional DiT on the digits: the run recorded in experiments/results/ddpm_digits.md.

zoo train dit --config experiments/dit_digits.py --workdir runs/dit_digits
python experiments/diffusion_fd.py dit runs/dit_digits
"""

from zoo import registry


def get_config():
    c = registry.get("dit").config()
    c.steps = 4000                 # as the ddpm run: ~180 epochs at batch 64
    c.model.num_classes = 10
    return c
