"""Variational autoencoder and plain autoencoder with MLP encoder/decoder.

VAE: Kingma & Welling 2014, "Auto-Encoding Variational Bayes". The loss is the negative SGVB
estimator of eq. 10: KL(q(z|x) || N(0, I)) in closed form (App. B) plus a one-sample reconstruction
term with the reparameterisation z = mean + exp(log_var / 2) * eps (eq. 4 / Sec. 2.4).
Held-out NLL is the importance-weighted bound of Burda et al. 2016 (eq. 8) with `eval_k` samples,
drawn in chunks of `eval_chunk` under lax.map so k = 1000 at B = 256 stays small in memory.

Noise is always drawn per example from (key, batch["idx"]) (zoo.ops.random), so jit on any mesh
and pmap give the same numbers.

Shape letters: B batch, Z latent dim, D flattened data dim (prod data_shape), K importance samples,
C samples per chunk, N samples drawn by `sample`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from zoo.errors import ConfigError, DataError, unknown
from zoo.eval.likelihood import bits_per_dim
from zoo.models.base import ModelDef
from zoo.nn.mlp import MLP
from zoo.ops import losses
from zoo.ops.random import example_keys, example_normal
from zoo.registry import register
from zoo.train.config import base_config

LIKELIHOODS = ("bernoulli", "gaussian")
LOG_SCALE_MIN = math.log(1.0 / 256.0)  # a Gaussian narrower than one 8-bit level only overfits


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    data_shape: tuple[int, ...]      # per-example shape, e.g. (8, 8, 1)
    latent_dim: int = 16             # Z
    hidden: tuple[int, ...] = (512, 256)  # encoder widths; the decoder mirrors them
    likelihood: str = "bernoulli"    # bernoulli (logits) | gaussian (mean + learned per-pixel scale)
    eval_k: int = 1000               # importance samples for the IWAE NLL in `evaluate`
    eval_chunk: int = 100            # samples per lax.map step in `evaluate` (memory, not numbers)

    def __post_init__(self):
        if self.likelihood not in LIKELIHOODS:
            raise ConfigError(unknown("likelihood", self.likelihood, LIKELIHOODS))
        if not self.data_shape or any(int(d) <= 0 for d in self.data_shape):
            raise ConfigError(f"data_shape must be positive ints, got {self.data_shape!r}")
        if int(self.latent_dim) <= 0:
            raise ConfigError(f"latent_dim must be > 0, got {self.latent_dim!r}")
        if any(int(h) <= 0 for h in self.hidden):
            raise ConfigError(f"hidden widths must be > 0, got {self.hidden!r}")
        if int(self.eval_k) < 1 or int(self.eval_chunk) < 1:
            raise ConfigError(f"eval_k and eval_chunk must be >= 1, got {self.eval_k}, {self.eval_chunk}")

    @property
    def num_dims(self) -> int:
        return math.prod(self.data_shape)


class Decoder(nn.Module):
    """z [B, Z] -> (logits or mean [B, *data_shape], log_scale [*data_shape] or None)."""

    hidden: Sequence[int]
    data_shape: tuple[int, ...]
    learn_scale: bool = False

    @nn.compact
    def __call__(self, z_BxZ):
        out_BxD = MLP((*reversed(self.hidden), math.prod(self.data_shape)), name="mlp")(z_BxZ)
        log_scale = None
        if self.learn_scale:
            raw = self.param("log_scale", nn.initializers.zeros, self.data_shape)
            log_scale = jnp.maximum(raw, LOG_SCALE_MIN)
        return out_BxD.reshape(z_BxZ.shape[0], *self.data_shape), log_scale


def _modules(cfg: VAEConfig, *, variational: bool):
    enc_out = 2 * cfg.latent_dim if variational else cfg.latent_dim
    encoder = MLP((*cfg.hidden, enc_out))
    learn_scale = variational and cfg.likelihood == "gaussian"
    return encoder, Decoder(tuple(cfg.hidden), tuple(cfg.data_shape), learn_scale)


def _check_x(cfg: VAEConfig, x):
    if tuple(x.shape[1:]) != tuple(cfg.data_shape):
        raise DataError(f"batch['x'] has per-example shape {tuple(x.shape[1:])}; model expects {cfg.data_shape}")
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


def _make_init(cfg: VAEConfig, encoder, decoder):
    def init(key, batch):
        x_BxD = _check_x(cfg, batch["x"])
        k_enc, k_dec = jax.random.split(key)
        z_BxZ = jnp.zeros((x_BxD.shape[0], cfg.latent_dim), jnp.float32)
        return {"encoder": encoder.init(k_enc, x_BxD)["params"],
                "decoder": decoder.init(k_dec, z_BxZ)["params"]}

    return init


def _log_lik(cfg: VAEConfig, out, log_scale, x):
    """log p(x | z) per example from the decoder's output: [B] (nats)."""
    if cfg.likelihood == "bernoulli":
        return losses.bernoulli_log_prob(out, x)
    return losses.gaussian_log_prob(x, out, log_scale)


def make_vae(*, data_shape, latent_dim=16, hidden=(512, 256), likelihood="bernoulli",
             eval_k=1000, eval_chunk=100) -> ModelDef:
    """VAE as a ModelDef; loss = mean over the batch of the negative ELBO (nats per example)."""
    cfg = VAEConfig(tuple(int(d) for d in data_shape), int(latent_dim), tuple(int(h) for h in hidden),
                    likelihood, int(eval_k), int(eval_chunk))
    encoder, decoder = _modules(cfg, variational=True)

    def encode(params, x_BxD):
        h_Bx2Z = encoder.apply({"params": params["encoder"]}, x_BxD)
        return jnp.split(h_Bx2Z, 2, axis=-1)  # mean_BxZ, log_var_BxZ

    def decode(params, z_BxZ):
        return decoder.apply({"params": params["decoder"]}, z_BxZ)

    def loss(params, key, batch):
        x = batch["x"].astype(jnp.float32)
        mean_BxZ, log_var_BxZ = encode(params, _check_x(cfg, x))
        eps_BxZ = example_normal(key, batch["idx"], (cfg.latent_dim,))
        z_BxZ = mean_BxZ + jnp.exp(0.5 * log_var_BxZ) * eps_BxZ
        out, log_scale = decode(params, z_BxZ)
        nll_recon_B = -_log_lik(cfg, out, log_scale, x)
        kl_B = losses.gaussian_kl_standard(mean_BxZ, log_var_BxZ)
        total = jnp.mean(nll_recon_B + kl_B)
        return total, {"loss": total, "nll_recon": jnp.mean(nll_recon_B), "kl": jnp.mean(kl_B)}

    def sample(params, key, n):
        out, _ = decode(params, jax.random.normal(key, (n, cfg.latent_dim)))
        return jax.nn.sigmoid(out) if cfg.likelihood == "bernoulli" else jnp.clip(out, 0.0, 1.0)

    def log_weights(params, keys_B, x, mean_BxZ, log_var_BxZ, k_C):
        """log p(x, z_k) - log q(z_k | x) for sample indices k_C: [C, B]."""
        c, b = k_C.shape[0], x.shape[0]
        # fold_in(example key, k): sample k is the same whatever the chunk size
        draw = lambda kb, k: jax.random.normal(jax.random.fold_in(kb, k), (cfg.latent_dim,))
        eps_CxBxZ = jax.vmap(lambda k: jax.vmap(lambda kb: draw(kb, k))(keys_B))(k_C)
        z_CxBxZ = mean_BxZ + jnp.exp(0.5 * log_var_BxZ) * eps_CxBxZ
        z_CBxZ = z_CxBxZ.reshape(c * b, -1)
        out, log_scale = decode(params, z_CBxZ)
        x_CB = jnp.broadcast_to(x, (c, *x.shape)).reshape(c * b, *x.shape[1:])
        log_px_z = _log_lik(cfg, out, log_scale, x_CB)
        log_pz = losses.standard_normal_log_prob(z_CBxZ)
        log_qz = losses.diag_gaussian_log_prob(
            z_CBxZ, jnp.tile(mean_BxZ, (c, 1)), jnp.tile(log_var_BxZ, (c, 1)))
        return (log_px_z + log_pz - log_qz).reshape(c, b)

    def evaluate(params, key, batch):
        x = batch["x"].astype(jnp.float32)
        mean_BxZ, log_var_BxZ = encode(params, _check_x(cfg, x))
        keys_B = example_keys(key, batch["idx"])
        chunk = min(cfg.eval_chunk, cfg.eval_k)
        n_chunks = -(-cfg.eval_k // chunk)

        def one_chunk(i):
            k_C = i * chunk + jnp.arange(chunk)
            log_w_CxB = log_weights(params, keys_B, x, mean_BxZ, log_var_BxZ, k_C)
            log_w_CxB = jnp.where((k_C < cfg.eval_k)[:, None], log_w_CxB, -jnp.inf)  # pad past K
            finite = jnp.where(jnp.isfinite(log_w_CxB), log_w_CxB, 0.0)
            return jax.nn.logsumexp(log_w_CxB, axis=0), jnp.sum(finite, axis=0)

        lse_NcxB, sum_NcxB = jax.lax.map(one_chunk, jnp.arange(n_chunks))
        iwae_B = jax.nn.logsumexp(lse_NcxB, axis=0) - math.log(cfg.eval_k)  # Burda et al. eq. 8
        elbo_B = jnp.sum(sum_NcxB, axis=0) / cfg.eval_k  # eval.elbo_from_log_w over the K samples
        return {"elbo": elbo_B, "nll_iwae": -iwae_B,
                "bits_per_dim_iwae": bits_per_dim(-iwae_B, cfg.num_dims)}

    return ModelDef(init=_make_init(cfg, encoder, decoder), loss=loss, sample=sample, evaluate=evaluate)


def make_ae(*, data_shape, latent_dim=16, hidden=(512, 256), likelihood="bernoulli") -> ModelDef:
    """Deterministic autoencoder; loss = Bernoulli reconstruction NLL (nats) or per-pixel MSE.

    `sample` decodes z ~ N(0, I): the latent space is not regularised, so this is a look at the
    decoder, not a proper generative model (that is what the VAE's KL term buys).
    """
    cfg = VAEConfig(tuple(int(d) for d in data_shape), int(latent_dim), tuple(int(h) for h in hidden),
                    likelihood)
    encoder, decoder = _modules(cfg, variational=False)

    def recon_B(params, x):
        z_BxZ = encoder.apply({"params": params["encoder"]}, _check_x(cfg, x))
        out, _ = decoder.apply({"params": params["decoder"]}, z_BxZ)
        if cfg.likelihood == "bernoulli":
            return -losses.bernoulli_log_prob(out, x)
        return jnp.mean((out - x).reshape(x.shape[0], -1) ** 2, axis=-1)

    def loss(params, key, batch):
        del key  # deterministic
        total = jnp.mean(recon_B(params, batch["x"].astype(jnp.float32)))
        return total, {"loss": total, "recon": total}

    def sample(params, key, n):
        out, _ = decoder.apply({"params": params["decoder"]}, jax.random.normal(key, (n, cfg.latent_dim)))
        return jax.nn.sigmoid(out) if cfg.likelihood == "bernoulli" else jnp.clip(out, 0.0, 1.0)

    def evaluate(params, key, batch):
        del key
        return {"recon": recon_B(params, batch["x"].astype(jnp.float32))}

    return ModelDef(init=_make_init(cfg, encoder, decoder), loss=loss, sample=sample, evaluate=evaluate)


# ---- registry ----

def _config(model_fields: dict[str, Any]) -> ml_collections.ConfigDict:
    c = base_config()
    c.data.name = "digits_binary"
    c.batch_size = 128
    c.steps = 5000
    c.optimizer.lr = 1e-3
    c.log_every = 50
    c.ckpt_every = 1000
    c.ema_decay = 0.0
    c.model = ml_collections.ConfigDict(model_fields)
    return c


def vae_config() -> ml_collections.ConfigDict:
    return _config({
        "latent_dim": 16,           # Z, size of the latent code
        "hidden": (512, 256),       # encoder MLP widths (decoder mirrors them)
        "likelihood": "bernoulli",  # bernoulli | gaussian (for [0,1] grey-level data)
        "eval_k": 1000,             # importance samples for the IWAE NLL at eval
        "eval_chunk": 100,          # samples per chunk at eval (memory only)
    })


def ae_config() -> ml_collections.ConfigDict:
    return _config({"latent_dim": 16, "hidden": (512, 256), "likelihood": "bernoulli"})


def _kwargs(model_cfg, make_fn) -> dict[str, Any]:
    """ConfigDict -> kwargs for make_fn; an unknown key is a ConfigError naming the valid ones."""
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    valid = sorted(make_fn.__kwdefaults__)  # the keyword hyperparameters (data_shape comes from info)
    for k in d:
        if k not in valid:
            raise ConfigError(unknown("model key", k, valid))
    return d


@register("vae", "Variational autoencoder (MLP, Bernoulli/Gaussian decoder, ELBO; Kingma & Welling 2014)",
          vae_config)
def build_vae(model_cfg, info) -> ModelDef:
    return make_vae(data_shape=tuple(info["shape"]), **_kwargs(model_cfg, make_vae))


@register("ae", "Deterministic autoencoder (MLP, Bernoulli NLL or MSE reconstruction)", ae_config)
def build_ae(model_cfg, info) -> ModelDef:
    return make_ae(data_shape=tuple(info["shape"]), **_kwargs(model_cfg, make_ae))
