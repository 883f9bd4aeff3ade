"""GPT: a decoder-only Transformer language model (Radford et al. 2018/2019), byte-level by default,
with KV-cache generation, LoRA (Hu et al. 2021) and soft-prompt tuning (Lester et al. 2021).

Architecture: token + learned position embeddings, pre-LN blocks (zoo.nn.transformer), a final
LayerNorm and an output layer tied to the token embedding (GPT-2's layout, so GPT-2 weights map
onto it: zoo.models.gpt2_import). Loss: next-token cross-entropy; `bits_per_byte` = nats / ln 2
per predicted token (bytes when vocab_size is 256).

Generation (`generate_tokens`): one prefill of the prompt into fixed-size per-block KV caches,
then one `lax.scan` over new tokens, each step a one-token forward against the caches; with
temperature 0 it equals re-running the full causal forward on the growing sequence (tested).

Fine-tuning (`model.init_from=WORKDIR` of a trained `gpt` run, whose architecture is then used;
alone it fine-tunes every weight; `model.finetune` picks a parameter-efficient method):
  "lora"    rank-r adapters on every attention and MLP projection; only adapters train (an optax
            mask, ModelDef.trainable); zoo.ops.lora.merge_lora folds them into plain GPT params.
  "prompt"  `prompt_len` learned embeddings prepended to the input (no position embedding: the
            text keeps positions 0..T-1 as in pretraining); the GPT itself is frozen.

Shape letters: B batch, T tokens, P soft-prompt length, H hidden, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from zoo.errors import ConfigError, DataError, unknown
from zoo.models.base import ModelDef, request_top_k
from zoo.nn.transformer import INIT_STD, LAYER_NORMS, QKV_MODES, Stack, init_caches
from zoo.ops.gelu import GELU_FORMS, GELU_GRADS
from zoo.ops.linear import WEIGHT_GRADS
from zoo.ops import losses, sampling
from zoo.ops.precision import dot_f32
from zoo.ops.attention import IMPLEMENTATIONS
from zoo.ops.logsumexp import IMPLEMENTATIONS as LOGSUMEXPS
from zoo.ops.lora import lora_mask
from zoo.registry import register
from zoo.train.config import base_config, transformer_optimizer

FINETUNE = ("", "lora", "prompt")
DTYPES = ("float32", "bfloat16")
XENT_MODES = ("logits", "fused")
ARCH_FIELDS = ("vocab_size", "max_len", "num_layers", "hidden", "num_heads", "num_kv_heads", "mlp_ratio")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    max_len: int = 256            # longest sequence (prompt + generated); the position table size
    num_layers: int = 4
    hidden: int = 256
    num_heads: int = 8
    num_kv_heads: int = 0         # 0 = num_heads (multi-head); fewer = grouped-query attention
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    implementation: str = ""      # attention implementation ("" = auto), see zoo.ops.attention
    dtype: str = "float32"        # compute dtype; params stay float32
    f32_logits: bool = True       # False: a bf16 model's logits stay bf16 (as autocast's); the loss is float32 either way
    finetune: str = ""            # "" | lora | prompt
    lora_rank: int = 8
    lora_alpha: float = 16.0
    prompt_len: int = 16
    qkv: str = "fused"            # attention's q/k/v projections: fused | fused-split-grad | separate (same params)
    gelu: str = "tanh"            # the MLP's GELU formula: tanh | sigmoid | epilogue (the same function, zoo.ops.gelu.bias_gelu)
    layer_norm: str = "auto"      # auto | xla | pallas: each residual add inside the next layer norm's kernel (zoo.ops.layer_norm; auto: pallas on an NVIDIA GPU, else xla)
    logsumexp: str = "auto"       # auto | xla | pallas: the loss's logsumexp in one kernel's pass over the logits (zoo.ops.logsumexp; auto as layer_norm's)
    xent: str = "logits"          # logits | fused: the training loss with the output layer inside (zoo.ops.losses.linear_cross_entropy: the logits never read in the backward)
    gelu_grad: str = "xla"        # xla | pallas | cublaslt (with gelu "epilogue", no LoRA): the GELU's backward inside the proj matmul's (zoo.ops.matmul_gelu)
    qkv_grad: str = "xla"         # xla | cublaslt (with qkv "separate", bf16/f16, no LoRA): each q/k/v projection's weight and bias gradients in one cuBLASLt matmul (zoo.ops.linear.dense)

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "num_layers", "hidden", "num_heads"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)!r}")
        if self.hidden % self.num_heads:
            raise ConfigError(f"model.hidden={self.hidden} must be a multiple of num_heads={self.num_heads}")
        if self.num_kv_heads < 0 or self.num_heads % self.kv_heads:
            raise ConfigError(f"model.num_heads={self.num_heads} must be a multiple of "
                              f"num_kv_heads={self.num_kv_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.qkv not in QKV_MODES:
            raise ConfigError(unknown("model.qkv", self.qkv, QKV_MODES))
        if self.gelu not in GELU_FORMS:
            raise ConfigError(unknown("model.gelu", self.gelu, GELU_FORMS))
        if self.layer_norm not in LAYER_NORMS:
            raise ConfigError(unknown("model.layer_norm", self.layer_norm, LAYER_NORMS))
        if self.logsumexp not in LOGSUMEXPS:
            raise ConfigError(unknown("model.logsumexp", self.logsumexp, LOGSUMEXPS))
        if self.xent not in XENT_MODES:
            raise ConfigError(unknown("model.xent", self.xent, XENT_MODES))
        if self.gelu_grad not in GELU_GRADS:
            raise ConfigError(unknown("model.gelu_grad", self.gelu_grad, GELU_GRADS))
        if self.gelu_grad != "xla" and (self.gelu != "epilogue" or self.finetune == "lora"):
            raise ConfigError(f"model.gelu_grad={self.gelu_grad} needs model.gelu=epilogue and no LoRA "
                              f"(got gelu={self.gelu}, finetune={self.finetune or 'none'})")
        if self.gelu_grad == "cublaslt" and self.dtype == "float32":
            raise ConfigError("model.gelu_grad=cublaslt needs a bfloat16 or float16 model.dtype (cuBLASLt's "
                              "DGELU epilogue takes those), got float32")
        if self.qkv_grad not in WEIGHT_GRADS:
            raise ConfigError(unknown("model.qkv_grad", self.qkv_grad, WEIGHT_GRADS))
        if self.qkv_grad != "xla" and (self.qkv != "separate" or self.finetune == "lora" or self.dtype == "float32"):
            raise ConfigError(f"model.qkv_grad={self.qkv_grad} needs model.qkv=separate, a bfloat16 or float16 "
                              f"model.dtype and no LoRA (got qkv={self.qkv}, dtype={self.dtype}, "
                              f"finetune={self.finetune or 'none'})")
        if self.implementation and self.implementation not in IMPLEMENTATIONS:
            raise ConfigError(unknown("model.implementation", self.implementation, IMPLEMENTATIONS))
        if self.dtype not in DTYPES:
            raise ConfigError(unknown("model.dtype", self.dtype, DTYPES))
        if self.finetune not in FINETUNE:
            raise ConfigError(unknown("model.finetune", self.finetune, ("lora", "prompt", "'' (none)")))
        if self.finetune == "lora" and self.lora_rank <= 0:
            raise ConfigError(f"model.lora_rank must be > 0 for LoRA, got {self.lora_rank}")
        if self.finetune == "prompt" and not 0 < self.prompt_len < self.max_len:
            raise ConfigError(f"model.prompt_len must be in (0, max_len={self.max_len}), got {self.prompt_len}")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def prefix_len(self) -> int:
        return self.prompt_len if self.finetune == "prompt" else 0


class GPT(nn.Module):
    """tokens [B, T] -> (logits [B, T, V], caches). prefix [B, P, H]: soft-prompt embeddings. The
    logits are float32, or in the compute dtype when cfg.f32_logits is False. head=False: the
    final layer norm's output [B, T, H] in the compute dtype in their place (the output layer is
    the tied `wte` table, for zoo.ops.losses.linear_cross_entropy)."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens_BxT, *, positions_T=None, prefix_BxPxH=None, caches=None,
                 deterministic: bool = True, head: bool = True):
        c = self.cfg
        dtype = jnp.dtype(c.dtype)
        wte = nn.Embed(c.vocab_size, c.hidden, embedding_init=nn.initializers.normal(INIT_STD), name="wte")
        wpe = self.param("wpe", nn.initializers.normal(INIT_STD / 2), (c.max_len, c.hidden))
        T = tokens_BxT.shape[1]
        positions_T = jnp.arange(T) if positions_T is None else positions_T
        x = wte(tokens_BxT) + wpe[positions_T]
        P = 0
        if prefix_BxPxH is not None:
            P = prefix_BxPxH.shape[1]
            x = jnp.concatenate([prefix_BxPxH.astype(x.dtype), x], axis=1)
        x = nn.Dropout(c.dropout)(x, deterministic=deterministic).astype(dtype)
        x, caches = Stack(c.num_layers, c.num_heads, c.kv_heads, c.mlp_ratio, causal=True,
                          dropout=c.dropout, lora_rank=c.lora_rank if c.finetune == "lora" else 0,
                          lora_alpha=c.lora_alpha, implementation=c.implementation or None,
                          dtype=dtype, qkv=c.qkv, gelu=c.gelu, layer_norm=c.layer_norm, gelu_grad=c.gelu_grad,
                          qkv_grad=c.qkv_grad,
                          name="stack")(x, caches=caches, deterministic=deterministic)
        if not head:
            return x[:, P:].astype(dtype), caches
        # the tied output layer in the compute dtype with float32 logits: nn.Embed.attend would
        # promote a bf16 x to the float32 table's dtype and run the largest matmul in float32, and
        # jnp.dot's own backward would too (float32 cotangent): dot_f32 keeps both in bf16
        if c.f32_logits:
            logits = dot_f32(x[:, P:].astype(dtype), wte.embedding.astype(dtype).T)
        else:  # half the bytes for the [B, T, V] logits and their gradient to cross
            logits = jnp.dot(x[:, P:].astype(dtype), wte.embedding.astype(dtype).T)
        return logits, caches


# ---------------------------------------------------------------------------------- pure functions


def split_params(cfg: GPTConfig, params):
    """(GPT params, soft prompt [P, H] or None) from the model's params."""
    if cfg.finetune == "prompt":
        return params["gpt"], params["soft_prompt"]
    return params, None


def forward(cfg: GPTConfig, params, tokens_BxT, *, positions_T=None, caches=None, use_prefix=True,
            key=None, head=True):
    """Logits [B, T, V] (and caches). Dropout runs when `key` is given and cfg.dropout > 0.
    head=False: the last hidden states [B, T, H] in place of the logits (GPT's head)."""
    gpt_params, prompt = split_params(cfg, params)
    prefix = None
    if prompt is not None and use_prefix:
        prefix = jnp.broadcast_to(prompt, (tokens_BxT.shape[0], *prompt.shape))
    train = key is not None and cfg.dropout > 0
    return GPT(cfg).apply({"params": gpt_params}, tokens_BxT, positions_T=positions_T,
                          prefix_BxPxH=prefix, caches=caches, deterministic=not train, head=head,
                          rngs={"dropout": key} if train else None)


def token_nll(cfg: GPTConfig, params, x_BxT1, key=None):
    """Next-token negative log-likelihood in nats [B, T] of x [B, T+1]; with cfg.xent "fused", the
    output layer and the loss as one op (the same values; the backward never reads the logits)."""
    if cfg.xent == "fused":
        h, _ = forward(cfg, params, x_BxT1[:, :-1], key=key, head=False)
        w = split_params(cfg, params)[0]["wte"]["embedding"]
        return losses.linear_cross_entropy(h, w, x_BxT1[:, 1:], logsumexp=cfg.logsumexp,
                                           logits_dtype=jnp.float32 if cfg.f32_logits else h.dtype)
    logits, _ = forward(cfg, params, x_BxT1[:, :-1], key=key)
    return losses.cross_entropy(logits, x_BxT1[:, 1:], logsumexp=cfg.logsumexp)


def empty_caches(cfg: GPTConfig, batch: int):
    return init_caches(cfg.num_layers, batch, cfg.max_len + cfg.prefix_len, cfg.kv_heads, cfg.head_dim,
                       jnp.dtype(cfg.dtype))


def generate_tokens(cfg: GPTConfig, params, key, prompt_BxT, max_new_tokens: int, *, temperature=1.0,
                    top_k=None, top_p=None):
    """Continue prompt [B, T] by max_new_tokens tokens with the KV cache: [B, max_new_tokens].

    Prefill runs the prompt (after the soft prompt, if any) into the caches; then one lax.scan
    step per token. temperature 0 is greedy. Jit it with the options static.
    """
    B, T = prompt_BxT.shape
    if T < 1 or T + max_new_tokens > cfg.max_len:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) must fit in "
                         f"1..max_len={cfg.max_len}")
    logits, caches = forward(cfg, params, prompt_BxT, caches=empty_caches(cfg, B))

    def step(carry, key_t):
        caches, logits_BxV, pos = carry
        tok = sampling.sample_logits(key_t, logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
        logits, caches = forward(cfg, params, tok[:, None], positions_T=pos[None], caches=caches,
                                 use_prefix=False)
        return (caches, logits[:, -1], pos + 1), tok

    keys = jax.random.split(key, max_new_tokens)
    _, toks = jax.lax.scan(step, (caches, logits[:, -1], jnp.int32(T)), keys)
    return toks.T


def greedy_uncached(cfg: GPTConfig, params, prompt_BxT, max_new_tokens: int):
    """Greedy continuation by re-running the full causal forward each step (the cache's reference).

    The sequence lives in a fixed buffer [B, T + max_new_tokens] (causality makes the unfilled
    tail irrelevant to the logits read), so the forward compiles once.
    """
    B, T = prompt_BxT.shape
    full = jax.jit(lambda p, s: forward(cfg, p, s)[0])
    seq = jnp.zeros((B, T + max_new_tokens), jnp.int32).at[:, :T].set(prompt_BxT)
    for t in range(T, T + max_new_tokens):
        seq = seq.at[:, t].set(sampling.greedy(full(params, seq)[:, t - 1]))
    return seq[:, T:]


def _encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def make_gpt(cfg: GPTConfig, pretrained=None, context: int | None = None) -> ModelDef:
    """ModelDef for a GPT; `pretrained`: GPT params (no adapters) that fine-tuning starts from;
    `context`: the sequence length it trains on (positions past it are untrained, so `generate`
    stops there unless asked for more, up to max_len)."""
    context = min(context or cfg.max_len, cfg.max_len)
    if cfg.finetune and pretrained is None:
        raise ConfigError(f"model.finetune={cfg.finetune} needs model.init_from=WORKDIR of a trained gpt")
    ln2 = math.log(2.0)

    def init(key, batch):
        x = batch["x"][:, :-1]
        if cfg.finetune == "prompt":
            # Lester et al. 2021, Sec. 3.2: start the prompt from embeddings of real tokens
            ids = jax.random.randint(key, (cfg.prompt_len,), 0, cfg.vocab_size)
            return {"gpt": pretrained, "soft_prompt": jnp.asarray(pretrained["wte"]["embedding"])[ids]}
        if pretrained is not None and not cfg.finetune:  # full fine-tuning
            return jax.tree.map(jnp.asarray, pretrained)
        params = GPT(cfg).init({"params": key}, x[:1])["params"]
        if cfg.finetune == "lora":  # pretrained kernels and biases, fresh adapters
            mask = lora_mask(params)
            flat_pre = jax.tree_util.tree_leaves_with_path(pretrained)
            pre = {jax.tree_util.keystr(p): v for p, v in flat_pre}
            return jax.tree_util.tree_map_with_path(
                lambda p, v, m: v if m else pre[jax.tree_util.keystr(p)], params, mask)
        return params

    def loss(params, key, batch):
        nll = token_nll(cfg, params, batch["x"], key)
        mean = nll.mean()
        return mean, {"bits_per_byte": mean / ln2}

    def evaluate(params, key, batch):
        x = batch["x"]
        logits, _ = forward(cfg, params, x[:, :-1])
        nll = losses.cross_entropy(logits, x[:, 1:], logsumexp=cfg.logsumexp)
        correct = (jnp.argmax(logits, -1) == x[:, 1:]).astype(jnp.float32)
        return {"bits_per_byte": nll.mean(-1) / ln2, "accuracy": correct.mean(-1)}

    gen = jax.jit(lambda params, key, prompt, n_new, t, k, p: generate_tokens(
        cfg, params, key, prompt, n_new, temperature=t, top_k=k, top_p=p), static_argnums=(3, 4, 5, 6))

    def generate(params, key, request):
        text = request.get("prompt")
        text = "\n\n" if not text else text
        prompt = _encode(text)
        n = request.get("n") or 4
        max_new = request.get("max_new_tokens") or max(1, context - len(prompt))
        if len(prompt) + max_new > cfg.max_len:
            raise DataError(f"prompt ({len(prompt)} bytes) + max_new_tokens ({max_new}) exceed the model's "
                            f"max_len={cfg.max_len}")
        temperature = 0.8 if request.get("temperature") is None else float(request["temperature"])
        toks = gen(params, key, jnp.asarray(np.tile(prompt, (n, 1))), int(max_new), temperature,
                   request_top_k(request, cfg.vocab_size), request.get("top_p"))
        outs = [(text + bytes(np.asarray(row, np.uint8).tolist()).decode("utf-8", errors="replace"))
                for row in np.asarray(toks)]
        return {"text": [f"--- sample {i}\n{s}" for i, s in enumerate(outs)]}

    trainable = None
    if cfg.finetune == "lora":
        trainable = lora_mask
    elif cfg.finetune == "prompt":
        trainable = lambda params: {"gpt": jax.tree.map(lambda _: False, params["gpt"]), "soft_prompt": True}
    return ModelDef(init=init, loss=loss, evaluate=evaluate, generate=generate, trainable=trainable,
                    sample_options=("n", "prompt", "max_new_tokens", "temperature", "top_k", "top_p"))


# ------------------------------------------------------------------------------------ registration


def gpt_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.data.name = "pydocs"
    c.data.seq_len = 128
    c.steps = 2000
    c.batch_size = 32
    c.log_every = 50
    c.ckpt_every = 1000
    transformer_optimizer(c, lr=2e-3, warmup_steps=100, weight_decay=0.1, b2=0.99)
    c.eval.batch_size = 64
    d = GPTConfig()
    c.model = ml_collections.ConfigDict({f.name: getattr(d, f.name) for f in dataclasses.fields(d)})
    c.model.hidden = 128
    c.model.num_heads = 4
    c.model.max_len = 128         # = data.seq_len: positions past the training length stay untrained
    c.model.init_from = ""        # fine-tuning: the workdir of a trained gpt (its architecture is used)
    return c


def _load_pretrained(workdir: str):
    """(model config dict, params) of a trained `gpt` run."""
    from zoo.train.workdir import trained_params

    def check(config):
        if config.model.get("finetune"):
            raise ConfigError(f"model.init_from={workdir} is itself a fine-tuning run; point at the pretrained gpt")

    config, params = trained_params(workdir, "gpt", check)
    return config.model.to_dict(), params


@register("gpt", "byte-level GPT (decoder-only Transformer) with KV-cache sampling, LoRA and soft prompts",
          gpt_config)
def build(model_cfg: ml_collections.ConfigDict, info: dict[str, Any]) -> ModelDef:
    if info.get("kind") != "text":
        raise DataError(f"gpt needs a text source (pydocs, text:PATH, npz token ids), got {info.get('name')!r}")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    kw = {k: v for k, v in model_cfg.to_dict().items() if k in fields}
    pretrained = None
    if model_cfg.get("init_from"):
        arch, pretrained = _load_pretrained(model_cfg.init_from)
        kw.update({k: arch[k] for k in ARCH_FIELDS})
    elif kw.get("finetune"):
        raise ConfigError(f"model.finetune={kw['finetune']} needs model.init_from=WORKDIR of a trained gpt")
    cfg = GPTConfig(**kw)
    if info.get("vocab_size", 256) > cfg.vocab_size:
        raise DataError(f"data has vocab_size {info.get('vocab_size')} > model.vocab_size {cfg.vocab_size}")
    if info["shape"][0] - 1 > cfg.max_len:
        raise ConfigError(f"data.seq_len={info['shape'][0] - 1} exceeds model.max_len={cfg.max_len}")
    return make_gpt(cfg, pretrained, context=info["shape"][0] - 1)
