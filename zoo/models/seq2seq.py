"""Sequence-to-sequence GRU with attention: a bidirectional GRU encoder and a GRU decoder that
attends over its states, trained with teacher forcing and decoded greedily.

Bahdanau et al. 2015, "Neural Machine Translation by Jointly Learning to Align and Translate"
(`attention="bahdanau"`): the previous decoder state s_{i-1} scores each annotation h_j (the
forward and backward encoder states side by side, Sec. 3.2) with e_ij = v_a . tanh(W_a s_{i-1} +
U_a h_j) (App. A.1.2), alpha_i = softmax_j(e_ij) and c_i = sum_j alpha_ij h_j (eqs. 5-6); the GRU
steps on [E y_{i-1}; c_i] (eq. 4) and the readout is one linear layer over [s_i; c_i; E y_{i-1}]
(the paper's maxout layer, App. A.2.2, made linear). s_0 = tanh(W_s [h->_S; h<-_1]) (the paper
uses h<-_1 alone).
Luong et al. 2015, "Effective Approaches to Attention-based Neural Machine Translation"
(`attention="luong"`, a GRU in place of the paper's stacked LSTM): the GRU steps first on
[E y_{t-1}; h~_{t-1}] (input feeding, Sec. 3.3), its new state h_t scores the annotations with the
"general" score h_t^T W_a h_s (eq. 8), c_t averages them, h~_t = tanh(W_c [c_t; h_t]) (eq. 5) and
p(y_t) = softmax(W_s h~_t) (eq. 6).
The scores are zoo.ops.attention.additive_attention / multiplicative_attention: pure functions
to which the decoder cell passes its own parameters.

Tokens: pad 0, bos 1, eos 2 (the convention of seq2seq sources such as zoo.data.dates). The batch
holds x [B, S] (right-padded inputs) and y [B, T+1] (bos, target, eos, pads); the loss is the
mean cross-entropy over the T non-pad target positions. Greedy decoding is one lax.scan whose carry
holds the previous argmax token.

Shape letters: B batch, S input length, T decoder steps, V vocabulary, E embedding width,
H GRU width (each encoder direction and the decoder), A additive attention width, N prompts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from zoo.errors import ConfigError, DataError, unknown
from zoo.models.base import ModelDef
from zoo.ops import losses
from zoo.ops.attention import additive_attention, multiplicative_attention
from zoo.registry import register
from zoo.train.config import base_config

PAD, BOS, EOS = 0, 1, 2
ATTENTIONS = ("bahdanau", "luong")


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
    vocab_size: int                  # V, shared by inputs and targets
    attention: str = "bahdanau"      # bahdanau (additive, s_{i-1}) | luong (general, h_t, input feeding)
    embed_dim: int = 32              # E, input and output token embeddings
    hidden: int = 64                 # H, GRU width of each encoder direction and of the decoder
    attn_dim: int = 32               # A, Bahdanau's score layer (unused by luong)

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ConfigError(unknown("attention", self.attention, ATTENTIONS))
        for name in ("vocab_size", "embed_dim", "hidden", "attn_dim"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.vocab_size <= EOS:
            raise ConfigError(f"vocab_size must exceed the 3 special tokens, got {self.vocab_size}")


class Encoder(nn.Module):
    """x [B, S] -> annotations [B, S, 2H] (forward; backward) and the decoder's first state [B, H]."""

    vocab_size: int
    embed_dim: int
    hidden: int

    @nn.compact
    def __call__(self, x_BxS):
        len_B = jnp.maximum(jnp.sum(x_BxS != PAD, axis=-1), 1)  # right padding: the real length
        e_BxSxE = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(x_BxS)
        last_fwd, h_fwd = nn.RNN(nn.GRUCell(self.hidden, name="forward"), return_carry=True)(
            e_BxSxE, seq_lengths=len_B)
        # reverse within each sequence's length, outputs back in input order (flax flip_sequences)
        first_bwd, h_bwd = nn.RNN(nn.GRUCell(self.hidden, name="backward"), return_carry=True,
                                  reverse=True, keep_order=True)(e_BxSxE, seq_lengths=len_B)
        annotations_BxSx2H = jnp.concatenate([h_fwd, h_bwd], axis=-1)
        s0_BxH = jnp.tanh(nn.Dense(self.hidden, name="init_state")(
            jnp.concatenate([last_fwd, first_bwd], axis=-1)))
        return annotations_BxSx2H, s0_BxH


class DecoderCell(nn.Module):
    """One decoder step: (carry, token [B]) -> (carry, (logits [B, V], attention weights [B, S])).

    carry = (s [B, H], feed [B, H]): the GRU state and Luong's attentional state h~ for input
    feeding (bahdanau passes feed through unchanged).
    """

    vocab_size: int
    embed_dim: int
    hidden: int
    attention: str
    attn_dim: int

    @nn.compact
    def __call__(self, carry, tok_B, keys_BxSx2H, mask_BxS):
        s_BxH, feed_BxH = carry
        e_BxE = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(tok_B)
        gru = nn.GRUCell(self.hidden, name="gru")
        init = nn.initializers.lecun_normal()
        H2 = keys_BxSx2H.shape[-1]
        if self.attention == "bahdanau":
            W_q = self.param("W_q", init, (self.hidden, self.attn_dim))
            W_k = self.param("W_k", init, (H2, self.attn_dim))
            v_a = self.param("v_a", nn.initializers.normal(self.attn_dim ** -0.5), (self.attn_dim,))
            ctx_Bx2H, w_BxS = additive_attention(s_BxH, keys_BxSx2H, W_q, W_k, v_a, mask=mask_BxS)
            s_BxH, _ = gru(s_BxH, jnp.concatenate([e_BxE, ctx_Bx2H], -1))
            logits_BxV = nn.Dense(self.vocab_size, name="readout")(
                jnp.concatenate([s_BxH, ctx_Bx2H, e_BxE], -1))
            return (s_BxH, feed_BxH), (logits_BxV, w_BxS)
        s_BxH, _ = gru(s_BxH, jnp.concatenate([e_BxE, feed_BxH], -1))
        W_a = self.param("W_a", init, (self.hidden, H2))
        ctx_Bx2H, w_BxS = multiplicative_attention(s_BxH, keys_BxSx2H, W_a, mask=mask_BxS)
        feed_BxH = jnp.tanh(nn.Dense(self.hidden, use_bias=False, name="combine")(
            jnp.concatenate([ctx_Bx2H, s_BxH], -1)))
        logits_BxV = nn.Dense(self.vocab_size, name="readout")(feed_BxH)
        return (s_BxH, feed_BxH), (logits_BxV, w_BxS)


class Seq2SeqFns(NamedTuple):
    """The model's pure functions of params (what loss, evaluate and generate are made of)."""

    init: Callable          # (key, x [B, S]) -> params
    encode: Callable        # (params, x) -> (keys [B, S, 2H], carry, mask [B, S])
    decoder_step: Callable  # (params, carry, tok [B], keys, mask) -> (carry, (logits [B, V], w [B, S]))
    run_teacher_forced: Callable  # (params, x, y_in [B, T]) -> (logits [B, T, V], w [B, T, S])
    run_greedy: Callable    # (params, x, steps) -> (tokens [B, T], w [B, T, S]); steps static


def make_seq2seq_fns(cfg: Seq2SeqConfig) -> Seq2SeqFns:
    encoder = Encoder(cfg.vocab_size, cfg.embed_dim, cfg.hidden)
    cell = DecoderCell(cfg.vocab_size, cfg.embed_dim, cfg.hidden, cfg.attention, cfg.attn_dim)

    def init(key, x_BxS):
        k_enc, k_dec = jax.random.split(key)
        B, S = x_BxS.shape
        carry = (jnp.zeros((B, cfg.hidden)), jnp.zeros((B, cfg.hidden)))
        keys_BxSx2H = jnp.zeros((B, S, 2 * cfg.hidden))
        return {"encoder": encoder.init(k_enc, x_BxS)["params"],
                "decoder": cell.init(k_dec, carry, jnp.full((B,), BOS), keys_BxSx2H,
                                     x_BxS != PAD)["params"]}

    def encode(params, x_BxS):
        keys_BxSx2H, s0_BxH = encoder.apply({"params": params["encoder"]}, x_BxS)
        return keys_BxSx2H, (s0_BxH, jnp.zeros_like(s0_BxH)), x_BxS != PAD

    def decoder_step(params, carry, tok_B, keys_BxSx2H, mask_BxS):
        return cell.apply({"params": params["decoder"]}, carry, tok_B, keys_BxSx2H, mask_BxS)

    def run_teacher_forced(params, x_BxS, y_in_BxT):
        keys_BxSx2H, carry, mask_BxS = encode(params, x_BxS)
        step = lambda c, tok_B: decoder_step(params, c, tok_B, keys_BxSx2H, mask_BxS)
        _, (logits_TxBxV, w_TxBxS) = jax.lax.scan(step, carry, y_in_BxT.T)
        return jnp.swapaxes(logits_TxBxV, 0, 1), jnp.swapaxes(w_TxBxS, 0, 1)

    def run_greedy(params, x_BxS, steps: int):
        keys_BxSx2H, carry, mask_BxS = encode(params, x_BxS)

        def step(c, _):
            dec_carry, tok_B = c
            dec_carry, (logits_BxV, w_BxS) = decoder_step(params, dec_carry, tok_B, keys_BxSx2H, mask_BxS)
            tok_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
            return (dec_carry, tok_B), (tok_B, w_BxS)

        bos_B = jnp.full((x_BxS.shape[0],), BOS, jnp.int32)
        _, (tok_TxB, w_TxBxS) = jax.lax.scan(step, (carry, bos_B), None, length=steps)
        return tok_TxB.T, jnp.swapaxes(w_TxBxS, 0, 1)

    return Seq2SeqFns(init, encode, decoder_step, run_teacher_forced, run_greedy)


def _check_batch(batch):
    if "y" not in batch:
        raise DataError("seq2seq needs batch['y'] (target ids): use a seq2seq source such as `dates`")
    x, y = batch["x"], batch["y"]
    if x.ndim != 2 or y.ndim != 2 or y.shape[1] < 2 or not jnp.issubdtype(x.dtype, jnp.integer):
        raise DataError(f"seq2seq wants int x [B, S] and y [B, T+1] (bos first), T >= 1; got "
                        f"x {x.dtype} {x.shape}, y {y.dtype} {y.shape}")
    return x.astype(jnp.int32), y.astype(jnp.int32)


def _nll_B(logits_BxTxV, tgt_BxT, valid_BxT):
    """Mean cross-entropy per example over its non-pad target positions: [B]."""
    ce_BxT = losses.cross_entropy(logits_BxTxV, tgt_BxT)
    return jnp.sum(ce_BxT * valid_BxT, -1) / jnp.maximum(jnp.sum(valid_BxT, -1), 1)


def make_seq2seq(*, vocab_size, attention="bahdanau", embed_dim=32, hidden=64, attn_dim=32,
                 vocab=None, examples=(), input_len=None, target_len=None) -> ModelDef:
    """GRU encoder-decoder with attention as a ModelDef.

    vocab (id -> string), examples (default prompts), input_len (S of training) and target_len
    (bos + output + eos) describe the data; `generate` exists when vocab and both lengths are given.
    """
    cfg = Seq2SeqConfig(int(vocab_size), attention, int(embed_dim), int(hidden), int(attn_dim))
    fns = make_seq2seq_fns(cfg)

    def init(key, batch):
        x_BxS, _ = _check_batch(batch)
        return fns.init(key, x_BxS)

    def loss(params, key, batch):
        del key  # deterministic
        x_BxS, y = _check_batch(batch)
        tgt_BxT, valid_BxT = y[:, 1:], y[:, 1:] != PAD
        logits_BxTxV, _ = fns.run_teacher_forced(params, x_BxS, y[:, :-1])
        nll_B = _nll_B(logits_BxTxV, tgt_BxT, valid_BxT)
        hits = jnp.sum((jnp.argmax(logits_BxTxV, -1) == tgt_BxT) & valid_BxT)
        total = jnp.mean(nll_B)  # nats per target token; token_accuracy here is teacher-forced
        return total, {"loss": total, "token_accuracy": hits / jnp.maximum(jnp.sum(valid_BxT), 1)}

    def evaluate(params, key, batch):
        """Greedy decoding: exact_match (the whole output up to eos) and token_accuracy; nll is
        teacher-forced (nats per target token)."""
        del key
        x_BxS, y = _check_batch(batch)
        tgt_BxT, valid_BxT = y[:, 1:], y[:, 1:] != PAD
        pred_BxT, _ = fns.run_greedy(params, x_BxS, tgt_BxT.shape[1])
        hit_BxT = (pred_BxT == tgt_BxT) & valid_BxT
        n_B = jnp.maximum(jnp.sum(valid_BxT, -1), 1)
        logits_BxTxV, _ = fns.run_teacher_forced(params, x_BxS, y[:, :-1])
        return {"exact_match": jnp.all(hit_BxT | ~valid_BxT, -1).astype(jnp.float32),
                "token_accuracy": jnp.sum(hit_BxT, -1) / n_B,
                "nll": _nll_B(logits_BxTxV, tgt_BxT, valid_BxT)}

    generate = None
    if vocab is not None and input_len is not None and target_len is not None:
        generate = _make_generate(fns, list(vocab), tuple(examples), int(input_len), int(target_len) - 1)
    return ModelDef(init=init, loss=loss, evaluate=evaluate, generate=generate, sample_options=("prompt",))


# ---- generate: `zoo sample seq2seq [--prompt TEXT]` ----

def attention_image(w_TxS, inputs: str, outputs: str, *, cell: int = 16) -> np.ndarray:
    """An attention map as a grey image [H, W] in [0, 1]: a row per output character, a column per
    input character, each labelled; darker = more weight."""
    from PIL import Image, ImageDraw, ImageFont

    w_TxS = np.clip(np.asarray(w_TxS, np.float32)[: len(outputs), : len(inputs)], 0.0, 1.0)
    T, S = w_TxS.shape
    img = Image.new("L", ((S + 1) * cell, (T + 1) * cell), 255)
    heat = ((1.0 - w_TxS) * 255).astype(np.uint8).repeat(cell, 0).repeat(cell, 1)
    img.paste(Image.fromarray(heat), (cell, cell))
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=cell - 4)
    for j, ch in enumerate(inputs[:S]):
        draw.text(((j + 1.5) * cell, cell / 2), ch, fill=0, font=font, anchor="mm")
    for i, ch in enumerate(outputs[:T]):
        draw.text((cell / 2, (i + 1.5) * cell), ch, fill=0, font=font, anchor="mm")
    return np.asarray(img, np.float32) / 255.0


def _make_generate(fns: Seq2SeqFns, vocab: list[str], examples: tuple[str, ...], input_len: int,
                   steps: int):
    char_ids = {tok: i for i, tok in enumerate(vocab) if i > EOS}
    greedy = jax.jit(fns.run_greedy, static_argnums=2)

    def encode(texts: list[str]) -> np.ndarray:
        """Right-padded to the training length, as the model saw its inputs."""
        for t in texts:
            bad = sorted({c for c in t if c not in char_ids})
            if bad or not 0 < len(t) <= input_len:
                raise DataError(f"cannot encode {t!r}: " + (
                    f"characters {''.join(bad)!r} are not in the vocabulary {''.join(char_ids)!r}"
                    if bad else f"want 1 to {input_len} characters, got {len(t)}"))
        return np.array([[char_ids[c] for c in t] + [PAD] * (input_len - len(t)) for t in texts], np.int32)

    def decode(ids) -> str:
        out = []
        for i in np.asarray(ids).tolist():
            if i == EOS:
                break
            out.append(vocab[i] if i > EOS else "")
        return "".join(out)

    def generate(params, key, request):
        """Greedy translations of request["prompt"] ("|" separates several) or of the source's
        examples: {"text": ["input -> output"], "images": {"attention": [N, H, W, 1]}}."""
        del key  # greedy decoding draws nothing
        prompt = (request or {}).get("prompt")
        texts = [t.strip() for t in prompt.split("|")] if prompt else list(examples)
        if not texts:
            raise DataError("no --prompt given and the data source has no example inputs")
        tok_NxT, w_NxTxS = jax.device_get(greedy(params, jnp.asarray(encode(texts)), steps))
        outs = [decode(row) for row in tok_NxT]
        maps = [attention_image(w, t, o) for w, t, o in zip(w_NxTxS, texts, outs)]
        H, W = max(m.shape[0] for m in maps), max(m.shape[1] for m in maps)
        grid = np.ones((len(maps), H, W, 1), np.float32)
        for n, m in enumerate(maps):
            grid[n, : m.shape[0], : m.shape[1], 0] = m
        return {"text": [f"{t} -> {o}" for t, o in zip(texts, outs)], "images": {"attention": grid}}

    return generate


# ---- registry ----

def seq2seq_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.data.name = "dates"       # a seq2seq source: int x [N, S], y [N, T+1]
    c.batch_size = 128
    c.steps = 800
    c.optimizer.lr = 3e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 100
    c.optimizer.grad_clip = 1.0   # RNNs: clip the occasional exploding gradient
    c.log_every = 50
    c.ckpt_every = 1000
    c.eval.batch_size = 500
    c.model = ml_collections.ConfigDict({
        "attention": "bahdanau",  # bahdanau (additive) | luong (multiplicative "general", input feeding)
        "embed_dim": 32,          # E, token embedding width
        "hidden": 64,             # H, GRU width (each encoder direction and the decoder)
        "attn_dim": 32,           # A, Bahdanau's score layer (unused by luong)
    })
    return c


@register("seq2seq", "GRU encoder-decoder with Bahdanau or Luong attention (dates -> ISO; "
          "Bahdanau et al. 2015, Luong et al. 2015)", seq2seq_config)
def build_seq2seq(model_cfg, info) -> ModelDef:
    if info.get("kind") != "seq2seq":
        raise DataError(f"seq2seq needs a seq2seq data source (int x -> y), such as dates; "
                        f"{info.get('name')!r} is {info.get('kind')!r}")
    d: dict[str, Any] = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    valid = sorted(f.name for f in dataclasses.fields(Seq2SeqConfig) if f.name != "vocab_size")
    for k in d:
        if k not in valid:
            raise ConfigError(unknown("model key", k, valid))
    shape = info.get("shape") or (None,)
    return make_seq2seq(vocab_size=int(info["vocab_size"]), vocab=info.get("vocab"),
                        examples=tuple(info.get("examples", ())), input_len=shape[0],
                        target_len=info.get("target_len"), **d)
