"""score2d on the toy 2-D sets: the runs recorded in experiments/results/score2d_toy2d.md.

for d in moons gaussians8 swissroll; do
  zoo train score2d --config experiments/score2d_toy2d.py --workdir runs/score2d_$d data.name=toy2d:$d
  zoo eval score2d --workdir runs/score2d_$d      # nll (model, probability-flow ODE) and true_nll
done
"""

from zoo import registry


def get_config():
    c = registry.get("score2d").config()
    c.steps = 10000                # batch 512: ~250 epochs of the 20,000 training points
    return c
