"""`lda`: Latent Dirichlet Allocation trained by online variational Bayes through the shared loop.

The math is zoo.ops.lda (Hoffman, Blei & Bach 2010, Algorithm 2). The update is not gradient
descent on a loss, so the model gives the loop a custom `step`: an E-step on the batch (gamma
started at Gamma(100, 1/100) draws, as scikit-learn's `fit`), then the natural-gradient M-step with
rho = (tau0 + t)^-kappa, t counted from 1 like scikit-learn's `n_batch_iter_`. The loop's optimizer
is never applied (its config block is ignored). params = {"lam": [K, V]}, initialised like
scikit-learn's `components_` (Gamma(100, 1/100)).

Data: any x [N, V] of non-negative word counts (float or int): `pydocs_bow`, or `npz:PATH` with
x int/float [N, V] (then set model.num_docs, the training corpus size D, since an npz source does
not report it). Negative counts are not checked inside the jitted step: they give a wrong model.

Held-out perplexity (`zoo eval lda`): `evaluate` returns per document "neg_bound" (minus its part
of the variational bound) and "words"; `zoo eval` reports perplexity = exp(sum neg_bound / sum
words), scikit-learn's `perplexity`. scikit-learn charges the corpus-level topic term
E[log p(beta) - log q(beta)] once per evaluated set, so `evaluate` adds it to the document whose
global index is 0 only: the total is then the same for any eval batch size.
The train "loss" metric is a cheap proxy: the per-word negative word term of the bound on the batch,
-sum n_dw log sum_k exp(E log theta_dk + E log beta_kw) / sum n_dw, from the step's own E-step
before the M-step (the theta and topic terms are left out: gammaln next to digamma doubles the
step's XLA compile time on CPU).

Shape letters: B documents, K topics, V vocabulary words, N words shown per topic.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from zoo.errors import ConfigError, DataError, unknown
from zoo.models.base import ModelDef
from zoo.ops import lda
from zoo.ops.random import example_keys
from zoo.registry import register
from zoo.train.config import base_config

GAMMA_SHAPE = 100  # scikit-learn's init of components_ and of gamma in fit: Gamma(100, 1/100)


def gamma_init(key, shape):
    """Gamma(100, scale 1/100) draws of `shape`, exactly, as a sum of 100 Exp(1) (Erlang).

    jax.random.gamma's rejection sampler costs ~1.5 s of XLA compile time per call site on CPU,
    more than the whole training run's E-steps; 100 uniforms per value cost nothing by comparison.
    """
    u = jax.random.uniform(key, (*shape, GAMMA_SHAPE))
    return -jnp.sum(jnp.log1p(-u), -1) / GAMMA_SHAPE


@dataclasses.dataclass(frozen=True)
class LDAConfig:
    vocab_size: int              # V
    num_docs: int                # D, the training corpus size (scales the M-step)
    num_topics: int = 20         # K
    alpha: float | None = None   # doc-topic prior (scikit-learn's doc_topic_prior); None = 1/K
    eta: float | None = None     # topic-word prior (topic_word_prior); None = 1/K
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
        for name in ("alpha", "eta"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"model.{name} must be > 0 (or None for 1/num_topics), got {v}")
        if self.tau0 < 0 or self.e_step_iters < 1 or self.e_step_tol <= 0:
            raise ConfigError("model.tau0 must be >= 0, e_step_iters >= 1 and e_step_tol > 0")


def make_lda(*, vocab_size, num_docs, num_topics=20, alpha=None, eta=None, tau0=10.0, kappa=0.7,
             e_step_iters=100, e_step_tol=1e-3) -> ModelDef:
    """LDA as a ModelDef with a custom `step` (see the module docstring)."""
    opt = lambda v: None if v is None else float(v)
    cfg = LDAConfig(int(vocab_size), int(num_docs), int(num_topics), opt(alpha), opt(eta),
                    float(tau0), float(kappa), int(e_step_iters), float(e_step_tol))
    K, V = cfg.num_topics, cfg.vocab_size
    a = 1.0 / K if cfg.alpha is None else cfg.alpha
    e = 1.0 / K if cfg.eta is None else cfg.eta
    e_kw = dict(max_iters=cfg.e_step_iters, tol=cfg.e_step_tol)

    def counts(batch):
        x = batch["x"]
        if x.ndim != 2 or x.shape[1] != V:
            raise DataError(f"lda wants word counts x [B, {V}]; got {tuple(x.shape)}")
        return x.astype(jnp.float32)

    def init(key, batch):
        counts(batch)
        return {"lam": gamma_init(key, (K, V))}

    def word_loss(lam, x, gamma):
        """-sum_dw n_dw log sum_k exp(E log theta_dk + E log beta_kw) / sum n: the bound's word term."""
        exp_theta_BxK = jnp.exp(lda.dirichlet_expectation(gamma))
        log_norm_BxV = jnp.log(exp_theta_BxK @ jnp.exp(lda.dirichlet_expectation(lam)))
        return -jnp.sum(jnp.where(x > 0, x * log_norm_BxV, 0.0)) / jnp.maximum(jnp.sum(x), 1.0)

    def loss(params, key, batch):  # never differentiated (the custom step trains): a metric only
        del key
        x = counts(batch)
        gamma, _ = lda.e_step(params["lam"], x, a, **e_kw)
        value = word_loss(params["lam"], x, gamma)
        return value, {"loss": value}

    def step(state, key, batch):
        x, lam = counts(batch), state.params["lam"]
        gamma0 = jax.vmap(lambda k: gamma_init(k, (K,)))(example_keys(key, batch["idx"]))
        gamma, sstats = lda.e_step(lam, x, a, gamma0_BxK=gamma0, **e_kw)
        rho = lda.learning_rate(state.step + 1.0, cfg.tau0, cfg.kappa)
        new = lda.m_step(lam, sstats, eta=e, num_docs=cfg.num_docs, batch_size=x.shape[0], rho=rho)
        return state.replace(params={"lam": new}), {"loss": word_loss(lam, x, gamma), "rho": rho}

    def evaluate(params, key, batch):
        del key  # gamma starts at ones, as scikit-learn's transform/perplexity
        x, lam = counts(batch), params["lam"]
        gamma, _ = lda.e_step(lam, x, a, **e_kw)
        bound_B = lda.doc_bound(lam, x, gamma, a)
        bound_B = bound_B + jnp.where(batch["idx"] == 0, lda.topic_bound(lam, e), 0.0)
        return {"neg_bound": -bound_B, "words": jnp.sum(x, -1)}

    def sample(params, key, n):
        """The n most probable word ids of each topic: int32 [K, n] (deterministic)."""
        del key
        if not 1 <= n <= V:
            raise ValueError(f"lda's sample gives the top n words per topic: n must be in [1, {V}], got {n}")
        return jax.lax.top_k(params["lam"], n)[1].astype(jnp.int32)

    return ModelDef(init=init, loss=loss, sample=sample, step=step, evaluate=evaluate)


# ---- registry ----

def lda_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.data.name = "pydocs_bow"   # its vocabulary: 2000 words (set data.vocab_size to change it)
    c.batch_size = 256           # documents per online update (scikit-learn's batch_size)
    c.steps = 130                # passes * ceil(N / batch_size): 10 passes over 3,313 documents
    c.log_every = 13
    c.ckpt_every = 130
    c.eval.batch_size = 256      # any size: the perplexity does not depend on it
    # c.optimizer is unused: the custom step does its own natural-gradient update
    c.model = ml_collections.ConfigDict({
        "num_topics": 20,        # K
        "alpha": None,           # doc-topic Dirichlet prior; None = 1/K (scikit-learn's default)
        "eta": None,             # topic-word Dirichlet prior; None = 1/K
        "tau0": 10.0,            # learning_offset: rho_t = (tau0 + t)^-kappa
        "kappa": 0.7,            # learning_decay, in (0.5, 1]
        "e_step_iters": 100,     # max E-step iterations per document (max_doc_update_iter)
        "e_step_tol": 1e-3,      # E-step stop: mean |change of gamma| < tol (mean_change_tol)
        "num_docs": None,        # D; None = the size of the training split (data sources that report it)
    })
    return c


_KEYS = tuple(f.name for f in dataclasses.fields(LDAConfig) if f.name != "vocab_size")


@register("lda", "Latent Dirichlet Allocation, online variational Bayes (Hoffman et al. 2010)", lda_config,
          samples="topics")
def build_lda(model_cfg, info) -> ModelDef:
    kw = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    for k in kw:
        if k not in _KEYS:
            raise ConfigError(unknown("model key", k, sorted(_KEYS)))
    if len(info["shape"]) != 1:
        raise DataError(f"lda wants bag-of-words counts x [N, V]; {info.get('name')} has examples "
                        f"of shape {tuple(info['shape'])}")
    if not kw.get("num_docs"):
        kw["num_docs"] = info.get("num_examples")
        if not kw["num_docs"]:
            raise ConfigError(f"data source {info.get('name')!r} does not report its size: set "
                              "model.num_docs to the number of training documents")
    return make_lda(vocab_size=info["shape"][0], **kw)
