"""BERT: masked-language-model pretraining of a bidirectional Transformer encoder (Devlin et al.
2019, Sec. 3.1 "Task #1: Masked LM"), byte-level on `pydocs` by default.

Masking (Devlin et al. 2019, Sec. 3.1 and App. A.1): exactly round(mask_rate * T) positions per
sequence are chosen; of those, 80% become [MASK], 10% a random byte and 10% stay as they are; the
loss is the cross-entropy at the chosen positions only. The choice is drawn per example from
(key, batch["idx"]) (zoo.ops.random), so it is the same on any device count; `evaluate` draws it
from a fixed key, so held-out masked-token accuracy is reproducible.

Architecture: token + learned position embeddings, pre-LN encoder blocks (zoo.nn.transformer;
the original is post-LN), then the MLM head of the original: Dense -> GELU -> LayerNorm -> output
layer tied to the token embedding, plus an output bias.

Sampling (`zoo sample bert --prompt "...[MASK]..."`): fill_masks fills each masked byte, the most
confident first, one per forward pass (Mask-Predict's decoding, one token at a time).

Shape letters: B batch, T tokens, H hidden, V vocabulary (bytes + [MASK]), M masked per sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from zoo.errors import ConfigError, DataError
from zoo.models.base import ModelDef, request_top_k
from zoo.nn.dense import Dense
from zoo.nn.transformer import INIT_STD, Stack
from zoo.ops import losses, sampling
from zoo.ops.random import example_keys
from zoo.registry import register
from zoo.train.config import base_config, transformer_optimizer


@dataclasses.dataclass(frozen=True)
class BERTConfig:
    vocab_size: int = 256          # data tokens; [MASK] is id vocab_size
    max_len: int = 64
    num_layers: int = 4
    hidden: int = 128
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    mask_rate: float = 0.15
    implementation: str = ""

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "num_layers", "hidden", "num_heads"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)!r}")
        if self.hidden % self.num_heads:
            raise ConfigError(f"model.hidden={self.hidden} must be a multiple of num_heads={self.num_heads}")
        if not 0.0 < self.mask_rate < 1.0:
            raise ConfigError(f"model.mask_rate must be in (0, 1), got {self.mask_rate}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def num_masked(self, T: int) -> int:
        return max(1, round(self.mask_rate * T))


class BERT(nn.Module):
    """tokens [B, T] (may hold mask_id) -> MLM logits over the data vocabulary [B, T, V]."""

    cfg: BERTConfig

    @nn.compact
    def __call__(self, tokens_BxT, *, deterministic: bool = True):
        c = self.cfg
        wte = nn.Embed(c.vocab_size + 1, c.hidden, embedding_init=nn.initializers.normal(INIT_STD), name="wte")
        wpe = self.param("wpe", nn.initializers.normal(INIT_STD), (c.max_len, c.hidden))
        x = wte(tokens_BxT) + wpe[: tokens_BxT.shape[1]]
        x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
        x, _ = Stack(c.num_layers, c.num_heads, c.num_heads, c.mlp_ratio, dropout=c.dropout,
                     implementation=c.implementation or None, name="encoder")(x, deterministic=deterministic)
        h = nn.LayerNorm(1e-5, name="head_ln")(nn.gelu(Dense(c.hidden, name="head_dense")(x)))
        bias = self.param("head_bias", nn.initializers.zeros, (c.vocab_size,))
        return h @ wte.embedding[: c.vocab_size].T + bias


def mask_tokens(cfg: BERTConfig, key, tokens_BxT, idx_B):
    """(inputs [B, T], positions [B, M] of the predicted tokens): the 80/10/10 corruption."""
    B, T = tokens_BxT.shape
    M = cfg.num_masked(T)

    def one(key, tokens_T):
        k_pos, k_kind, k_rand = jax.random.split(key, 3)
        pos_M = jax.random.permutation(k_pos, T)[:M]
        u_M = jax.random.uniform(k_kind, (M,))
        rand_M = jax.random.randint(k_rand, (M,), 0, cfg.vocab_size)
        new_M = jnp.where(u_M < 0.8, cfg.mask_id, jnp.where(u_M < 0.9, rand_M, tokens_T[pos_M]))
        return tokens_T.at[pos_M].set(new_M.astype(tokens_T.dtype)), pos_M

    return jax.vmap(one)(example_keys(key, idx_B), tokens_BxT)


MASK_TEXT = "[MASK]"  # in a prompt: one masked byte


def encode_masked(text: str, cfg: BERTConfig) -> np.ndarray:
    """A prompt's tokens [T]: its UTF-8 bytes, each MASK_TEXT one cfg.mask_id."""
    parts = [np.frombuffer(part.encode("utf-8"), np.uint8).astype(np.int32) for part in text.split(MASK_TEXT)]
    out = [parts[0]]
    for part in parts[1:]:
        out += [np.array([cfg.mask_id], np.int32), part]
    return np.concatenate(out)


def fill_masks(cfg: BERTConfig, params, key, tokens_BxT, *, temperature=0.0, top_k=None, top_p=None):
    """Fill every cfg.mask_id in tokens [B, T], one position per forward pass: [B, T] int32.

    Each pass runs the encoder on the current tokens, takes the masked position whose most likely
    byte is the most probable (the model's most confident guess), and fills it, greedily
    (temperature 0) or by zoo.ops.sampling.sample_logits; later passes see the bytes filled
    before them. That is Mask-Predict's decoding with one token per pass (Ghazvininejad et al.
    2019, Sec. 3.2): spans of several masks come out consistent, where one pass would predict each
    mask alone. Rows run until their own masks are gone; a row without masks is returned as is.
    Jit-friendly: a lax.while_loop over passes, as many as the row with the most masks needs.
    """
    model = BERT(cfg)
    tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
    B, T = tokens_BxT.shape
    if T > cfg.max_len:
        raise ValueError(f"{T} tokens exceed the model's max_len={cfg.max_len}")

    def one_pass(carry):
        tokens, key = carry
        key, k_draw = jax.random.split(key)
        logits_BxTxV = model.apply({"params": params}, tokens).astype(jnp.float32)
        masked_BxT = tokens == cfg.mask_id
        confidence_BxT = jnp.max(jax.nn.log_softmax(logits_BxTxV, -1), -1)
        pos_B = jnp.argmax(jnp.where(masked_BxT, confidence_BxT, -jnp.inf), -1)
        logits_BxV = jnp.take_along_axis(logits_BxTxV, pos_B[:, None, None], 1)[:, 0]
        byte_B = sampling.sample_logits(k_draw, logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
        rows_B = jnp.arange(B)
        fill_B = jnp.where(masked_BxT[rows_B, pos_B], byte_B, tokens[rows_B, pos_B])
        return tokens.at[rows_B, pos_B].set(fill_B), key

    tokens, _ = jax.lax.while_loop(lambda c: jnp.any(c[0] == cfg.mask_id), one_pass, (tokens_BxT, key))
    return tokens


def grow_params(trained, fresh, cfg: BERTConfig):
    """Params of the `cfg` model starting from a trained shallower (or equal) one: every trained
    tensor kept; each block past the trained ones from `fresh`, with its attention and MLP output
    projections zeroed, so the block adds nothing to the residual stream and the grown model
    computes exactly the trained one's function at its first step (the identity initialisation of
    Net2Net's deeper nets, Chen et al. 2016, Sec. 3.3; pre-LN blocks make it exact). Widths, heads
    and lengths must match."""
    t_blocks = sorted(k for k in trained["encoder"] if k.startswith("block_"))
    f_blocks = sorted(k for k in fresh["encoder"] if k.startswith("block_"))
    if len(t_blocks) > len(f_blocks):
        raise ConfigError(f"model.init_from has {len(t_blocks)} layers, more than model.num_layers="
                          f"{len(f_blocks)}: a model can grow deeper from a checkpoint, not shallower")
    shapes = lambda tree: jax.tree.map(jnp.shape, tree)  # noqa: E731
    rest = lambda tree: {k: v for k, v in tree.items() if k != "encoder"}  # noqa: E731
    if (shapes(rest(trained)) != shapes(rest(fresh)) or shapes(trained["encoder"]["ln_f"]) !=
            shapes(fresh["encoder"]["ln_f"]) or any(shapes(trained["encoder"][b]) != shapes(fresh["encoder"][b])
                                                    for b in t_blocks)):
        raise ConfigError("model.init_from: the trained bert's hidden size, heads, MLP width, vocabulary "
                          "or max_len differ from this config's; only num_layers may grow")
    encoder = dict(fresh["encoder"])
    encoder.update({k: trained["encoder"][k] for k in t_blocks + ["ln_f"]})
    for b in f_blocks[len(t_blocks):]:
        block = jax.tree.map(lambda a: a, fresh["encoder"][b])  # a copy to edit
        for layer in (block["attn"]["out"], block["mlp"]["proj"]):
            layer["kernel"] = jnp.zeros_like(layer["kernel"])
            layer["bias"] = jnp.zeros_like(layer["bias"])
        encoder[b] = block
    return {**jax.tree.map(jnp.asarray, rest(trained)), "encoder": jax.tree.map(jnp.asarray, encoder)}


def make_bert(cfg: BERTConfig, pretrained=None) -> ModelDef:
    """ModelDef of a BERT; `pretrained`: a trained bert's params to start from (grown to
    cfg.num_layers by grow_params)."""
    model = BERT(cfg)

    def init(key, batch):
        params = model.init({"params": key}, batch["x"][:1, :-1])["params"]
        return params if pretrained is None else grow_params(pretrained, params, cfg)

    def predictions(params, key, batch, dropout_key=None):
        tokens = batch["x"][:, :-1]  # windows carry a next-byte target column; MLM does not need it
        inputs, pos_BxM = mask_tokens(cfg, key, tokens, batch["idx"])
        train = dropout_key is not None and cfg.dropout > 0
        logits = model.apply({"params": params}, inputs, deterministic=not train,
                             rngs={"dropout": dropout_key} if train else None)
        logits_BxMxV = jnp.take_along_axis(logits, pos_BxM[..., None], axis=1)
        return logits_BxMxV, jnp.take_along_axis(tokens, pos_BxM, axis=1)

    def loss(params, key, batch):
        k_mask, k_drop = jax.random.split(key)
        logits, targets = predictions(params, k_mask, batch, k_drop)
        nll = losses.cross_entropy(logits, targets).mean()
        acc = (jnp.argmax(logits, -1) == targets).mean()
        return nll, {"masked_accuracy": acc}

    def evaluate(params, key, batch):
        logits, targets = predictions(params, jax.random.PRNGKey(1234), batch)  # fixed masks
        nll = losses.cross_entropy(logits, targets)
        return {"masked_accuracy": (jnp.argmax(logits, -1) == targets).mean(-1), "masked_nll": nll.mean(-1)}

    fill = jax.jit(lambda params, key, tokens, temperature, top_k, top_p: fill_masks(
        cfg, params, key, tokens, temperature=temperature, top_k=top_k, top_p=top_p), static_argnums=(3, 4, 5))

    def generate(params, key, request):
        """Fill the [MASK]s of request["prompt"] (one byte each): greedily by default, printed once;
        with a temperature > 0, request["n"] (default 4) draws."""
        text = request.get("prompt") or DEFAULT_PROMPT
        tokens_T = encode_masked(text, cfg)
        if not (tokens_T == cfg.mask_id).any():
            raise DataError(f"bert fills masked bytes: put {MASK_TEXT} in --prompt where each unknown "
                            f"byte goes, e.g. {DEFAULT_PROMPT!r}")
        if len(tokens_T) > cfg.max_len:
            raise DataError(f"the prompt is {len(tokens_T)} bytes ({MASK_TEXT} counting one), over the "
                            f"model's max_len={cfg.max_len}")
        temperature = float(request.get("temperature") or 0.0)
        n = 1 if temperature == 0 else int(request.get("n") or 4)
        out = fill(params, key, jnp.asarray(np.tile(tokens_T, (n, 1))), temperature,
                   request_top_k(request, cfg.vocab_size), request.get("top_p"))
        texts = [bytes(np.asarray(row, np.uint8).tolist()).decode("utf-8", errors="replace")
                 for row in np.asarray(out)]
        return {"text": [text] + [f"-> {t}" for t in texts]}

    return ModelDef(init=init, loss=loss, evaluate=evaluate, generate=generate,
                    sample_options=("n", "prompt", "temperature", "top_k", "top_p"))


DEFAULT_PROMPT = "Return the [MASK][MASK][MASK][MASK][MASK] of the items in the list."


def bert_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.data.name = "pydocs"
    c.data.seq_len = 64           # shorter windows leave MLM's early plateau sooner (see results)
    c.steps = 16000               # 75.7% held-out masked-byte accuracy (experiments/results)
    c.batch_size = 32
    c.log_every = 50
    c.ckpt_every = 1000
    transformer_optimizer(c, lr=2e-3, warmup_steps=200, weight_decay=0.01, b2=0.99)
    c.eval.batch_size = 64
    d = BERTConfig()
    c.model = ml_collections.ConfigDict({f.name: getattr(d, f.name) for f in dataclasses.fields(d)})
    # the workdir of a trained bert to start from; num_layers may be larger (new blocks start as
    # the identity: grow_params)
    c.model.init_from = ""
    return c


def bert_config_from(model_cfg: ml_collections.ConfigDict) -> BERTConfig:
    """The BERTConfig of a run's `model` block (its other keys, e.g. init_from, left out)."""
    fields = {f.name for f in dataclasses.fields(BERTConfig)}
    return BERTConfig(**{k: v for k, v in model_cfg.to_dict().items() if k in fields})


@register("bert", "BERT masked-language-model pretraining (bidirectional Transformer encoder), bytes",
          bert_config)
def build(model_cfg: ml_collections.ConfigDict, info: dict[str, Any]) -> ModelDef:
    if info.get("kind") != "text":
        raise DataError(f"bert needs a text source (pydocs, text:PATH), got {info.get('name')!r}")
    cfg = bert_config_from(model_cfg)
    if info.get("vocab_size", 256) > cfg.vocab_size:
        raise DataError(f"data has vocab_size {info.get('vocab_size')} > model.vocab_size {cfg.vocab_size}")
    if info["shape"][0] - 1 > cfg.max_len:
        raise ConfigError(f"data.seq_len={info['shape'][0] - 1} exceeds model.max_len={cfg.max_len}")
    pretrained = None
    if model_cfg.get("init_from"):
        from zoo.train.workdir import trained_params

        pretrained = trained_params(model_cfg.init_from, "bert")[1]
    return make_bert(cfg, pretrained)
