"""`lda`: Latent Dirichlet Allocation trained by online variational Bayes through the shared loop.

The math is zoo.ops.lda (Hoffman, Blei & Bach 2010). The update is not gradient descent on a loss,
so the model gives the loop a custom `step` (E-step on the batch, natural-gradient M-step with
rho = (tau0 + t)^-kappa, t counted from 1 like scikit-learn); the loop's optimizer is unused.
Held-out perplexity: `zoo eval lda` (evaluate returns per-document bound and word counts; with the
whole test split in one eval batch the corpus-level topic term is shared exactly as scikit-learn
does). `zoo sample lda` prints the top words of each topic.

Shape letters: B documents, K topics, V vocabulary words, N words shown per topic.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from zoo.errors import ConfigError, DataError
from zoo.models.base import ModelDef
from zoo.ops import lda
from zoo.registry import register
from zoo.train.config import base_config


@dataclasses.dataclass(frozen=True)
class LDAConfig:
    vocab_size: int
    num_docs: int
    num_topics: int = 20
    alpha: float = 0.0           # doc-topic prior; 0 = 1/K (scikit-learn's default)
    eta: float = 0.0             # topic-word prior; 0 = 1/K
    tau0: float = 10.0           # learning_offset
    kappa: float = 0.7           # learning_decay
    e_step_iters: int = 100      # max_doc_update_iter
    e_step_tol: float = 1e-3     # mean_change_tol

    def __post_init__(self):
        if self.num_topics < 1 or self.vocab_size < 1 or self.num_docs < 1:
            raise ConfigError(f"lda needs num_topics, vocab_size, num_docs >= 1; got "
                              f"{self.num_topics}, {self.vocab_size}, {self.num_docs}")
        if not 0.5 < self.kappa <= 1.0:
            raise ConfigError(f"model.kappa must be in (0.5, 1] for convergence, got {self.kappa}")
        if self.alpha < 0 or self.eta < 0 or self.tau0 < 0:
            raise ConfigError("model.alpha, model.eta and model.tau0 must be >= 0")


def make_lda(*, vocab_size, num_docs, num_topics=20, alpha=0.0, eta=0.0, tau0=10.0, kappa=0.7,
             e_step_iters=100, e_step_tol=1e-3) -> ModelDef:
    cfg = LDAConfig(int(vocab_size), int(num_docs), int(num_topics), float(alpha), float(eta),
                    float(tau0), float(kappa), int(e_step_iters), float(e_step_tol))
    K = cfg.num_topics
    a, e = (cfg.alpha or 1.0 / K), (cfg.eta or 1.0 / K)

    def counts(batch):
        x = batch["x"]
        if x.ndim != 2 or x.shape[1] != cfg.vocab_size:
            raise DataError(f"lda wants counts [B, {cfg.vocab_size}], got {x.shape}")
        return x.astype(jnp.float32)

    def init(key, batch):
        counts(batch)
        return {"lam": jax.random.gamma(key, 100.0, (K, cfg.vocab_size)) / 100.0}

    def loss(params, key, batch):  # the per-word negative bound of the batch (not trained on)
        x = counts(batch)
        gamma, _ = lda.e_step(params["lam"], x, a, max_iters=cfg.e_step_iters, tol=cfg.e_step_tol)
        nb = -jnp.sum(lda.doc_bound(params["lam"], x, gamma, a)) / jnp.sum(x)
        return nb, {"loss": nb}

    def step(state, key, batch):
        x = counts(batch)
        lam = state.params["lam"]
        gamma0 = jax.random.gamma(key, 100.0, (x.shape[0], K)) / 100.0  # scikit-learn's random init
        gamma, sstats = lda.e_step(lam, x, a, gamma0_BxK=gamma0, max_iters=cfg.e_step_iters, tol=cfg.e_step_tol)
        rho = lda.learning_rate(state.step + 1.0, cfg.tau0, cfg.kappa)
        new = lda.m_step(lam, sstats, eta=e, num_docs=cfg.num_docs, batch_size=x.shape[0], rho=rho)
        nb = -jnp.sum(lda.doc_bound(lam, x, gamma, a)) / jnp.sum(x)
        return state.replace(params={"lam": new}), {"loss": nb, "rho": rho}

    def evaluate(params, key, batch):
        x = counts(batch)
        gamma, _ = lda.e_step(params["lam"], x, a, max_iters=cfg.e_step_iters, tol=cfg.e_step_tol)
        per_doc = lda.doc_bound(params["lam"], x, gamma, a) + lda.topic_bound(params["lam"], e) / x.shape[0]
        return {"neg_bound": -per_doc, "words": jnp.sum(x, -1)}

    def sample(params, key, n):
        return jnp.argsort(-params["lam"], axis=1)[:, :n].astype(jnp.int32)

    return ModelDef(init=init, loss=loss, sample=sample, step=step, evaluate=evaluate)


def lda_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.data.name = "pydocs_bow"
    c.data.vocab_size = 2000     # pydocs_bow: vocabulary size
    c.batch_size = 256
    c.steps = 130                # 10 passes over the 3313 training documents
    c.log_every = 13
    c.ckpt_every = 65
    c.eval.batch_size = 4096     # the whole test split in one batch (see the module docstring)
    c.model = ml_collections.ConfigDict({
        "num_topics": 20, "alpha": 0.0, "eta": 0.0, "tau0": 10.0, "kappa": 0.7,
        "e_step_iters": 100, "e_step_tol": 1e-3, "num_docs": 0})  # num_docs 0 = the training set's
    return c


@register("lda", "Latent Dirichlet Allocation, online variational Bayes (Hoffman et al. 2010)", lda_config)
def build_lda(model_cfg, info) -> ModelDef:
    kw = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    valid = {f.name for f in dataclasses.fields(LDAConfig)} - {"vocab_size"}
    bad = sorted(set(kw) - valid)
    if bad:
        raise ConfigError(f"unknown model key {bad[0]!r}; valid: {', '.join(sorted(valid))}")
    if len(info["shape"]) != 1:
        raise DataError(f"lda wants bag-of-words counts [N, V]; {info['name']} has examples of shape {info['shape']}")
    kw["num_docs"] = kw.get("num_docs") or info.get("num_examples", 0)
    if not kw["num_docs"]:
        raise ConfigError("set model.num_docs (the training corpus size) for this data source")
    return make_lda(vocab_size=info["shape"][0], **kw)
