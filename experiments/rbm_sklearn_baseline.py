"""scikit-learn's BernoulliRBM on the zoo's digits_binary split, scored by the zoo's AIS.

Same hidden size and epochs as the zoo run; the fitted weights go into the zoo's param dict
(W = components_.T, b = intercept_visible_, c = intercept_hidden_) and are scored by exactly the
AIS that `zoo eval rbm` runs (same chains, temperatures, key and base rates).

    python experiments/rbm_sklearn_baseline.py --hidden 100 --epochs 100 [--batch-size 10 --lr 0.1]
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.neural_network import BernoulliRBM

from zoo.data import load
from zoo.ops import gibbs


def ais_log_likelihood(params, test_x, *, chains=256, betas=20000, seed=0) -> dict:
    v = jnp.asarray(test_x, jnp.float32)
    log_z, se = jax.jit(gibbs.ais_log_partition, static_argnums=(2, 3))(
        jax.random.PRNGKey(seed), params, chains, betas, data_mean=jnp.mean(v, 0))
    return {"log_likelihood": float(jnp.mean(gibbs.log_likelihood(params, v, log_z))),
            "log_Z": float(log_z), "log_Z_std_err": float(se)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=10)   # scikit-learn's default
    ap.add_argument("--lr", type=float, default=0.1)        # scikit-learn's default
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    train, test = load("digits_binary", "train"), load("digits_binary", "test")
    tr = train[np.arange(len(train))]["x"].reshape(len(train), -1)
    te = test[np.arange(len(test))]["x"].reshape(len(test), -1)
    rbm = BernoulliRBM(n_components=a.hidden, learning_rate=a.lr, batch_size=a.batch_size,
                       n_iter=a.epochs, random_state=a.seed)
    t = time.perf_counter()
    rbm.fit(tr)
    wall = time.perf_counter() - t
    params = {"W": jnp.asarray(rbm.components_.T, jnp.float32),
              "b": jnp.asarray(rbm.intercept_visible_, jnp.float32),
              "c": jnp.asarray(rbm.intercept_hidden_, jnp.float32)}
    print(json.dumps({"model": "sklearn.BernoulliRBM", **vars(a), "fit_seconds": round(wall, 2),
                      **ais_log_likelihood(params, te)}))


if __name__ == "__main__":
    main()
