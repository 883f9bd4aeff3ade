"""Class-conditional DDPM on the digits: the run recorded in experiments/results/ddpm_digits.md.

zoo train ddpm --config experiments/ddpm_digits.py --workdir runs/ddpm_digits
zoo sample ddpm --workdir runs/ddpm_digits --sampler ddim --steps 50 --guidance 3.0 --label 7
python experiments/diffusion_fd.py ddpm runs/ddpm_digits     # FD of DDPM / DDIM-50 / DPM-Solver-20
"""

from zoo import registry


def get_config():
    c = registry.get("ddpm").config()
    c.steps = 4000                 # ~180 epochs of the 1,437 training digits at batch 64
    c.model.num_classes = 10       # class-conditional, label dropout 0.1: guidance at sampling time
    return c
