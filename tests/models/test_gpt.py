"""GPT: forward against a NumPy transcription, KV-cache decoding against the full forward, LoRA
merge and masking, soft prompts, fine-tuning from a trained run, config errors, the CLI."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo.models  # noqa: F401
from tests.jaxprs import equations
from zoo.cli import main
from zoo.errors import ConfigError, DataError
from zoo.models.gpt import GPTConfig, forward, generate_tokens, greedy_uncached, make_gpt
from zoo.ops.lora import count_params, lora_mask, merge_lora

TINY = GPTConfig(max_len=24, num_layers=2, hidden=16, num_heads=4, num_kv_heads=2)
jit_forward = jax.jit(forward, static_argnums=0)
jit_generate = jax.jit(generate_tokens, static_argnums=(0, 4), static_argnames=("temperature",))


def _tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, t)), jnp.int32)


def _init(cfg, seed=0, scale=1.0):
    """Params; `scale` > 1 spreads the logits so greedy paths are not constant."""
    params = make_gpt(cfg).init(jax.random.key(seed), {"x": _tokens(1, 5)})
    return jax.tree.map(lambda p: p * scale, params)


# ---- NumPy reference ----

def _ln(x, p, eps=1e-5):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def _dense(x, p):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def _np_forward(cfg, params, tokens):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    N, K, D = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    x = p["wte"]["embedding"][tokens] + p["wpe"][:T]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(cfg.num_layers):
        blk = p["stack"][f"block_{i}"]
        h = _ln(x, blk["ln_1"])
        q = _dense(h, blk["attn"]["query"]).reshape(B, T, N, D)
        k = _dense(h, blk["attn"]["key"]).reshape(B, T, K, D)
        v = _dense(h, blk["attn"]["value"]).reshape(B, T, K, D)
        k, v = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
        s = np.einsum("btnd,bsnd->bnts", q, k) / math.sqrt(D)
        s = np.where(causal, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("bnts,bsnd->btnd", w, v).reshape(B, T, N * D)
        x = x + _dense(o, blk["attn"]["out"])
        h = _ln(x, blk["ln_2"])
        h = _dense(h, blk["mlp"]["fc"])
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
        x = x + _dense(h, blk["mlp"]["proj"])
    x = _ln(x, p["stack"]["ln_f"])
    return x @ p["wte"]["embedding"].T


def test_forward_matches_numpy_transcription():
    params = _init(TINY, scale=3.0)
    x = _tokens(2, 9)
    logits, _ = jit_forward(TINY, params, x)
    np.testing.assert_allclose(np.asarray(logits), _np_forward(TINY, params, x), rtol=1e-4, atol=1e-4)


def test_bf16_model_runs_every_matmul_in_bf16_with_float32_logits():
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    params, x = _init(cfg, scale=3.0), _tokens(2, 9)
    jaxpr = jax.make_jaxpr(lambda p: forward(cfg, p, x)[0])(params)

    found = [e for e in equations(jaxpr) if e.primitive.name == "dot_general"]  # nested ones too
    assert found and all(v.aval.dtype == jnp.bfloat16 for e in found for v in e.invars), \
        [(str(e.invars[0].aval), str(e.invars[1].aval)) for e in found]
    logits, _ = jit_forward(cfg, params, x)
    assert logits.dtype == jnp.float32  # the tied output layer accumulates and returns float32
    ref = _np_forward(TINY, params, x)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=0.05 * np.abs(ref).max())


def test_bf16_logits_option_keeps_the_loss_and_gradient():
    """f32_logits=False: a bf16 model's logits are bf16, and its loss and gradients agree with the
    float32-logits model's within bf16 rounding of the logits."""
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    params, x = _init(cfg, scale=1.0), _tokens(4, 12, seed=2)
    half = dataclasses.replace(cfg, f32_logits=False)
    logits, _ = jit_forward(half, params, x[:, :-1])
    assert logits.dtype == jnp.bfloat16
    grad = lambda c: jax.jit(jax.value_and_grad(lambda p: make_gpt(c).loss(p, jax.random.key(0), {"x": x})[0]))(params)
    (loss32, g32), (loss16, g16) = grad(cfg), grad(half)
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=1e-2)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.05 * float(np.abs(b).max()) + 1e-6)


def test_loss_is_mean_next_token_cross_entropy():
    params = _init(TINY)
    x = _tokens(3, 10, seed=1)
    loss, metrics = make_gpt(TINY).loss(params, jax.random.key(0), {"x": x})
    ref = _np_forward(TINY, params, x[:, :-1])
    ref = ref - ref.max(-1, keepdims=True)
    logp = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(x[:, 1:])[..., None], -1).mean()
    np.testing.assert_allclose(float(loss), nll, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["bits_per_byte"]), nll / math.log(2), rtol=1e-5)


# ---- KV cache ----

@pytest.mark.parametrize("layer_norm", ["xla", "pallas"])
def test_cached_decoding_equals_full_forward_logits(layer_norm):
    from zoo.models.gpt import empty_caches

    cfg = dataclasses.replace(TINY, layer_norm=layer_norm)
    params = _init(TINY, scale=2.0)
    x = _tokens(2, 14, seed=2)
    full, _ = jit_forward(TINY, params, x)  # the plain layer norms' model: the same function
    logits, caches = jit_forward(cfg, params, x[:, :5], caches=empty_caches(cfg, 2))  # prefill
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, :5]), atol=1e-5)
    for t in range(5, 14):  # one token at a time
        logits, caches = jit_forward(cfg, params, x[:, t:t + 1], positions_T=jnp.array([t]), caches=caches)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(full[:, t]), atol=1e-5)
    assert int(caches[0].length) == 14


def test_cached_greedy_generation_equals_uncached():
    params = _init(TINY, scale=3.0)
    prompt = _tokens(3, 4, seed=3)
    cached = jit_generate(TINY, params, jax.random.key(0), prompt, 12, temperature=0)
    uncached = greedy_uncached(TINY, params, prompt, 12)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
    assert len(set(np.asarray(cached).ravel().tolist())) > 3  # a path that is not one repeated token


def test_generation_checks_length():
    with pytest.raises(ValueError, match="max_len"):
        generate_tokens(TINY, _init(TINY), jax.random.key(0), _tokens(1, 20), 10)


# ---- LoRA and soft prompts ----

def test_lora_merge_gives_the_same_outputs():
    cfg = dataclasses.replace(TINY, finetune="lora", lora_rank=2, lora_alpha=4.0)
    from zoo.models.gpt import GPT

    params = GPT(cfg).init({"params": jax.random.key(0)}, _tokens(1, 4))["params"]
    # b starts at zero (identity update); make it non-zero so the merge has something to fold
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.05 if jax.tree_util.keystr(path).endswith("['lora_b']") else p, params)
    x = _tokens(2, 8, seed=4)
    with_adapters, _ = GPT(cfg).apply({"params": params}, x)
    merged = merge_lora(params, cfg.lora_alpha)
    plain_cfg = dataclasses.replace(cfg, finetune="")
    merged_out, _ = GPT(plain_cfg).apply({"params": merged}, x)
    np.testing.assert_allclose(np.asarray(merged_out), np.asarray(with_adapters), rtol=1e-3, atol=1e-4)
    base_out, _ = GPT(plain_cfg).apply({"params": merge_lora(params, 0.0)}, x)  # alpha 0: no update
    assert np.abs(np.asarray(base_out) - np.asarray(with_adapters)).max() > 1e-3
    mask = lora_mask(params)
    n_adapters = count_params(params, mask)
    # rank 2 on q, k, v, out, fc, proj of 2 blocks: r * (in + out) each
    H, KD, F = 16, 8, 64
    per_block = 2 * ((H + H) + 2 * (H + KD) + (H + H) + (H + F) + (F + H))
    assert n_adapters == 2 * per_block


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny gpt trained for a few steps through the CLI (what init_from points at)."""
    wd = tmp_path_factory.mktemp("gpt")
    rc = main(["train", "gpt", "--workdir", str(wd), "--steps", "4", "batch_size=8", "--no-progress",
               "model.hidden=16", "model.num_heads=2", "model.num_layers=1", "model.max_len=32",
               "data.seq_len=16", "log_every=1", "optimizer.warmup_steps=0"])
    assert rc == 0
    return str(wd)


def _flat_params(workdir, name="gpt"):
    from zoo.train.workdir import build, load_config, restore_params

    config = load_config(workdir, name)
    model_def, source = build(config)
    params, _ = restore_params(workdir, config, model_def, source)
    return params


@pytest.mark.parametrize("mode", ["lora", "prompt"])
def test_finetuning_trains_only_adapters(pretrained, tmp_path, mode):
    wd = tmp_path / mode
    rc = main(["train", "gpt", "--workdir", str(wd), "--steps", "6", "batch_size=8", "--no-progress",
               f"model.finetune={mode}", f"model.init_from={pretrained}", "data.name=pydocs:heldout",
               "data.seq_len=16", "model.prompt_len=4", "optimizer.lr=0.01", "optimizer.warmup_steps=0"])
    assert rc == 0
    base = _flat_params(pretrained)
    tuned = _flat_params(str(wd))
    if mode == "lora":
        mask = lora_mask(tuned)
        for (path, p), m in zip(jax.tree_util.tree_leaves_with_path(tuned), jax.tree.leaves(mask)):
            if not m:  # every pretrained weight is untouched
                ref = base
                for k in path:
                    ref = ref[k.key]
                np.testing.assert_array_equal(np.asarray(p), np.asarray(ref))
        assert any(np.abs(np.asarray(p)).max() > 0 for p, m in zip(jax.tree.leaves(tuned), jax.tree.leaves(mask))
                   if m)  # lora_b moved off zero
    else:
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), tuned["gpt"], base)
        assert tuned["soft_prompt"].shape == (4, 16)
    # the fine-tuned run samples and evaluates through the CLI
    assert main(["eval", "gpt", "--workdir", str(wd)]) == 0
    assert main(["sample", "gpt", "--workdir", str(wd), "--prompt", "The ", "--max-new-tokens", "5",
                 "--n", "1"]) == 0


def test_soft_prompt_cached_generation_equals_uncached():
    base = _init(TINY, scale=3.0)
    cfg = dataclasses.replace(TINY, finetune="prompt", prompt_len=3)
    params = {"gpt": base, "soft_prompt": jax.random.normal(jax.random.key(5), (3, 16)) * 2}
    prompt = _tokens(2, 4, seed=6)
    cached = jit_generate(cfg, params, jax.random.key(0), prompt, 8, temperature=0)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(greedy_uncached(cfg, params, prompt, 8)))
    plain = jit_generate(TINY, base, jax.random.key(0), prompt, 8, temperature=0)
    assert (np.asarray(plain) != np.asarray(cached)).any()  # the prefix changes the continuation


# ---- CLI and errors ----

def test_cli_sample_continues_the_prompt(pretrained, capsys):
    capsys.readouterr()
    assert main(["sample", "gpt", "--workdir", pretrained, "--prompt", "Return the", "--temperature", "0",
                 "--max-new-tokens", "8", "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("Return the") == 2
    assert main(["sample", "gpt", "--workdir", pretrained, "--prompt", "x" * 30, "--max-new-tokens", "8"]) == 2
    assert "max_len" in capsys.readouterr().err
    # a top-k above the vocabulary keeps every byte: the same draws as no top-k
    sampled = []
    for extra in ([], ["--top-k", "1000"]):
        assert main(["sample", "gpt", "--workdir", pretrained, "--prompt", "Re", "--max-new-tokens", "8",
                     "--temperature", "1", "--n", "3", *extra]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1]


def test_cli_sample_refuses_options_gpt_does_not_use(pretrained, capsys):
    capsys.readouterr()
    assert main(["sample", "gpt", "--workdir", pretrained, "--sampler", "ddim", "--label", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: gpt does not use --sampler, --label; its sampling options: --n, --prompt, "
                   "--max-new-tokens, --temperature, --top-k, --top-p (plus --seed, and --out for images)"], err


@pytest.mark.parametrize("flag, value, says", [
    ("--n", "0", "must be an integer >= 1, got 0"), ("--n", "x", "must be an integer >= 1, got 'x'"),
    ("--temperature", "-1", "must be a finite number >= 0"), ("--temperature", "inf", "finite number"),
    ("--top-k", "0", "integer >= 1"), ("--top-p", "1.5", "must be in (0, 1], got 1.5"),
    ("--top-p", "nan", "must be in (0, 1]"), ("--max-new-tokens", "-2", "integer >= 1"),
    ("--steps", "0", "integer >= 1"), ("--guidance", "-3", "number >= 0"),
])
def test_cli_sample_refuses_bad_options(pretrained, capsys, flag, value, says):
    capsys.readouterr()
    assert main(["sample", "gpt", "--workdir", pretrained, flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: argument {flag}: ") and says in err[0], err


@pytest.mark.parametrize("bad, match", [
    (dict(hidden=30, num_heads=4), "multiple of num_heads"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(implementation="flash"), "implementation"),
    (dict(finetune="adapters"), "finetune"),
    (dict(dtype="float16"), "dtype"),
])
def test_bad_config_is_a_clear_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        GPTConfig(**bad)


def test_finetune_without_pretrained_and_wrong_data_are_errors():
    from zoo import registry

    config = registry.get("gpt").config()
    config.model.finetune = "lora"
    with pytest.raises(ConfigError, match="init_from"):
        registry.get("gpt").build(config.model, {"kind": "text", "shape": (129,), "vocab_size": 256})
    with pytest.raises(DataError, match="text source"):
        registry.get("gpt").build(registry.get("gpt").config().model, {"kind": "image", "shape": (8, 8, 1)})
