"""Independent-pixel Bernoulli baseline: the NLL a VAE on binarised digits must clearly beat.

p(x) = prod_i theta_i^x_i (1 - theta_i)^(1 - x_i), theta fitted on the training split with add-one
smoothing; reports the held-out NLL in nats per digit on the same test split the VAE uses.

    python experiments/pixel_baseline.py
"""

import json

import numpy as np

from zoo.data import load


def pixel_baseline_nll(train_x: np.ndarray, test_x: np.ndarray) -> float:
    train_x = train_x.reshape(len(train_x), -1)
    test_x = test_x.reshape(len(test_x), -1)
    theta = (train_x.sum(0) + 1.0) / (len(train_x) + 2.0)
    ll = test_x @ np.log(theta) + (1.0 - test_x) @ np.log1p(-theta)
    return float(-ll.mean())


if __name__ == "__main__":
    train, test = load("digits_binary", "train"), load("digits_binary", "test")
    tr = train[np.arange(len(train))]["x"].astype(np.float64)
    te = test[np.arange(len(test))]["x"].astype(np.float64)
    print(json.dumps({"baseline": "independent-pixel Bernoulli", "test_examples": len(te),
                      "nll_nats": pixel_baseline_nll(tr, te)}))
