"""Encoder-decoder Transformer (Vaswani et al. 2017) for sequence-to-sequence tasks such as
`dates` (human-written dates -> ISO), built from zoo.nn.transformer's pre-LN blocks.

Encoder: token embedding * sqrt(H) + sinusoidal positions (Sec. 3.4-3.5), self-attention under a
key padding mask. Decoder: the same embedding (shared source/target vocabulary, Sec. 3.4), causal
self-attention, cross-attention to the encoder output, and an output layer tied to the embedding.
Teacher-forced cross-entropy over the non-pad target positions; greedy decoding re-runs the
decoder on a fixed-size buffer (targets are short), so it compiles once. `zoo sample transformer`
prints translations and saves the last decoder block's cross-attention (head-averaged) as a PNG,
with the same batch layout, metrics and sampling as the GRU `seq2seq` model.

Shape letters: B batch, S input length, T decoder steps, V vocabulary, H hidden.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from zoo.errors import ConfigError, DataError, unknown
from zoo.models.base import ModelDef
from zoo.models.seq2seq import BOS, PAD, Seq2SeqFns, _check_batch, _make_generate, _nll_B
from zoo.nn.transformer import INIT_STD, Stack, sinusoidal_positions
from zoo.registry import register
from zoo.train.config import base_config, transformer_optimizer


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    hidden: int = 64
    num_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    max_len: int = 64

    def __post_init__(self):
        for name in ("vocab_size", "hidden", "num_heads", "encoder_layers", "decoder_layers", "max_len"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)!r}")
        if self.hidden % self.num_heads or (self.hidden // self.num_heads) % 2:
            raise ConfigError(f"model.hidden={self.hidden} must be num_heads={self.num_heads} times an even head size")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


class EncoderDecoder(nn.Module):
    cfg: TransformerConfig

    def setup(self):
        c = self.cfg
        self.embed = nn.Embed(c.vocab_size, c.hidden, embedding_init=nn.initializers.normal(INIT_STD))
        kw = dict(num_heads=c.num_heads, num_kv_heads=c.num_heads, mlp_ratio=c.mlp_ratio, dropout=c.dropout)
        self.encoder = Stack(c.encoder_layers, **kw)
        self.decoder = Stack(c.decoder_layers, causal=True, cross_attention=True, **kw)
        self.drop = nn.Dropout(c.dropout)

    def _embed(self, tokens, deterministic):
        c = self.cfg
        if tokens.shape[1] > c.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} > model.max_len {c.max_len}")
        x = self.embed(tokens) * math.sqrt(c.hidden) + sinusoidal_positions(tokens.shape[1], c.hidden)
        return self.drop(x, deterministic=deterministic)

    def encode(self, x_BxS, deterministic=True):
        mask = (x_BxS != PAD)[:, None, None, :]
        memory, _ = self.encoder(self._embed(x_BxS, deterministic), mask=mask, deterministic=deterministic)
        return memory

    def decode(self, memory, x_BxS, y_BxT, deterministic=True):
        h, _ = self.decoder(self._embed(y_BxT, deterministic), memory=memory, memory_mask=x_BxS != PAD,
                            deterministic=deterministic)
        return self.embed.attend(h)

    def __call__(self, x_BxS, y_BxT, deterministic=True):
        return self.decode(self.encode(x_BxS, deterministic), x_BxS, y_BxT, deterministic)


def make_transformer_fns(cfg: TransformerConfig) -> Seq2SeqFns:
    """The functions seq2seq's evaluation and sampling use, for the Transformer."""
    model = EncoderDecoder(cfg)
    last = f"block_{cfg.decoder_layers - 1}"

    def init(key, x_BxS):
        return model.init({"params": key}, x_BxS, jnp.full((x_BxS.shape[0], 1), BOS, jnp.int32))["params"]

    def run_teacher_forced(params, x_BxS, y_in_BxT, dropout_key=None):
        train = dropout_key is not None and cfg.dropout > 0
        logits, state = model.apply({"params": params}, x_BxS, y_in_BxT, deterministic=not train,
                                    rngs={"dropout": dropout_key} if train else None,
                                    mutable=["intermediates"])
        weights = state["intermediates"]["decoder"][last]["cross_attn"]["weights"][0]
        return logits, weights

    def run_greedy(params, x_BxS, steps: int):
        memory = model.apply({"params": params}, x_BxS, method=EncoderDecoder.encode)
        B = x_BxS.shape[0]
        buf = jnp.zeros((B, steps), jnp.int32).at[:, 0].set(BOS)

        def step(buf, t):  # causal: positions after t do not change logits at t
            logits = model.apply({"params": params}, memory, x_BxS, buf, method=EncoderDecoder.decode)
            tok = jnp.argmax(logits[:, t], -1).astype(jnp.int32)
            return buf.at[:, jnp.minimum(t + 1, steps - 1)].set(jnp.where(t + 1 < steps, tok, buf[:, -1])), tok

        buf, toks = jax.lax.scan(step, buf, jnp.arange(steps))
        _, weights = run_teacher_forced(params, x_BxS, buf)
        return toks.T, weights

    unused = lambda *a, **k: (_ for _ in ()).throw(NotImplementedError("the Transformer has no RNN step"))
    return Seq2SeqFns(init, unused, unused, run_teacher_forced, run_greedy)


def make_transformer(cfg: TransformerConfig, *, vocab=None, examples=(), input_len=None,
                     target_len=None) -> ModelDef:
    fns = make_transformer_fns(cfg)

    def init(key, batch):
        x_BxS, _ = _check_batch(batch)
        return fns.init(key, x_BxS)

    def loss(params, key, batch):
        x_BxS, y = _check_batch(batch)
        tgt, valid = y[:, 1:], y[:, 1:] != PAD
        logits, _ = fns.run_teacher_forced(params, x_BxS, y[:, :-1], dropout_key=key)
        nll = jnp.mean(_nll_B(logits, tgt, valid))
        hits = jnp.sum((jnp.argmax(logits, -1) == tgt) & valid)
        return nll, {"token_accuracy": hits / jnp.maximum(jnp.sum(valid), 1)}

    def evaluate(params, key, batch):
        x_BxS, y = _check_batch(batch)
        tgt, valid = y[:, 1:], y[:, 1:] != PAD
        pred, _ = fns.run_greedy(params, x_BxS, tgt.shape[1])
        hit = (pred == tgt) & valid
        logits, _ = fns.run_teacher_forced(params, x_BxS, y[:, :-1])
        return {"exact_match": jnp.all(hit | ~valid, -1).astype(jnp.float32),
                "token_accuracy": jnp.sum(hit, -1) / jnp.maximum(jnp.sum(valid, -1), 1),
                "nll": _nll_B(logits, tgt, valid)}

    generate = None
    if vocab is not None and input_len is not None and target_len is not None:
        generate = _make_generate(fns, list(vocab), tuple(examples), int(input_len), int(target_len) - 1)
    return ModelDef(init=init, loss=loss, evaluate=evaluate, generate=generate, sample_options=("prompt",))


def transformer_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.data.name = "dates"
    c.batch_size = 128
    c.steps = 1500
    transformer_optimizer(c, lr=1e-3, warmup_steps=150, weight_decay=0.01, b2=0.98)
    c.log_every = 50
    c.ckpt_every = 1000
    c.eval.batch_size = 500
    c.model = ml_collections.ConfigDict({
        "hidden": 64, "num_heads": 4, "encoder_layers": 2, "decoder_layers": 2, "mlp_ratio": 4.0,
        "dropout": 0.0, "max_len": 64})
    return c


@register("transformer", "encoder-decoder Transformer (Vaswani et al. 2017) on a seq2seq source (dates -> ISO)",
          transformer_config)
def build(model_cfg, info: dict[str, Any]) -> ModelDef:
    if info.get("kind") != "seq2seq":
        raise DataError(f"transformer needs a seq2seq data source (int x -> y), such as dates; "
                        f"{info.get('name')!r} is {info.get('kind')!r}")
    d = model_cfg.to_dict()
    valid = sorted(f.name for f in dataclasses.fields(TransformerConfig) if f.name != "vocab_size")
    for k in d:
        if k not in valid:
            raise ConfigError(unknown("model key", k, valid))
    cfg = TransformerConfig(vocab_size=int(info["vocab_size"]), **d)
    shape = info.get("shape") or (None,)
    return make_transformer(cfg, vocab=info.get("vocab"), examples=tuple(info.get("examples", ())),
                            input_len=shape[0], target_len=info.get("target_len"))
