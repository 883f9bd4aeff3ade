"""GPT-2 weight import/export: safetensors I/O, zoo -> GPT-2 -> zoo round trip, and (when torch and
transformers are installed) logits against a randomly initialised Hugging Face GPT2LMHeadModel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.errors import DataError
from zoo.models.gpt import GPTConfig, forward, make_gpt
from zoo.models.gpt2_import import (from_gpt2, load_gpt2, load_state_dict, read_safetensors, to_gpt2,
                                    write_safetensors)

CFG = GPTConfig(vocab_size=50, max_len=16, num_layers=2, hidden=24, num_heads=3)


def _params(cfg=CFG, seed=0):
    x = jnp.zeros((1, 5), jnp.int32)
    p = make_gpt(cfg).init(jax.random.key(seed), {"x": x})
    # non-trivial LayerNorm params and biases, so a swapped tensor shows
    return jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), p)


def test_safetensors_round_trip(tmp_path):
    r = np.random.default_rng(0)
    tensors = {"a": r.standard_normal((3, 4)).astype(np.float32), "b": np.arange(5, dtype=np.int64),
               "c.d": r.standard_normal(7).astype(np.float16)}
    path = write_safetensors(str(tmp_path / "t.safetensors"), tensors)
    back = read_safetensors(path)
    assert sorted(back) == sorted(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype
        np.testing.assert_array_equal(back[k], tensors[k])
    st = pytest.importorskip("safetensors.numpy")  # the reference implementation, when installed
    for k, v in st.load_file(path).items():
        np.testing.assert_array_equal(v, tensors[k])


def test_zoo_to_gpt2_and_back_is_exact(tmp_path):
    params = _params()
    sd = to_gpt2(CFG, params)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (24, 72)
    assert sd["lm_head.weight"] is sd["transformer.wte.weight"]
    path = write_safetensors(str(tmp_path / "model.safetensors"), sd)
    cfg, back = load_gpt2(path, num_heads=3)
    assert cfg == CFG
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, params)


def test_bad_files_and_state_dicts_are_clear_errors(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(DataError, match="not a safetensors"):
        read_safetensors(str(bad))
    with pytest.raises(DataError, match="not found"):
        load_state_dict(str(tmp_path / "missing.safetensors"))
    sd = to_gpt2(CFG, _params())
    with pytest.raises(DataError, match="not a GPT-2"):
        from_gpt2({k: v for k, v in sd.items() if "wte" not in k}, 3)
    with pytest.raises(DataError, match="lacks"):
        from_gpt2({k: v for k, v in sd.items() if "h.1.ln_2.bias" not in k}, 3)
    with pytest.raises(DataError, match="does not use"):
        from_gpt2({**sd, "transformer.h.0.extra.weight": np.zeros(3, np.float32)}, 3)


def test_logits_match_transformers_gpt2(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=3,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # HF zero-inits biases and sets LayerNorm to identity: perturb them
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    tokens = np.random.default_rng(0).integers(0, 50, (2, 16))
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens)).logits.numpy()
    cfg, params = from_gpt2(model.state_dict(), num_heads=3)
    ours, _ = forward(cfg, params, jnp.asarray(tokens, jnp.int32))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
    # files: torch's own .bin and HF's safetensors
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    _, from_bin = load_gpt2(str(tmp_path / "pytorch_model.bin"), num_heads=3)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    _, from_st = load_gpt2(str(tmp_path / "hf" / "model.safetensors"), num_heads=3)
    for other in (from_bin, from_st):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b)), other, params)
    # and back: the exported state_dict loads strictly into a fresh HF model with the same logits
    fresh = transformers.GPT2LMHeadModel(hf_cfg).eval()
    missing, unexpected = fresh.load_state_dict({k: torch.as_tensor(v) for k, v in to_gpt2(cfg, params).items()},
                                                strict=False)
    assert not unexpected and all(k.endswith("attn.bias") or k.endswith("masked_bias") for k in missing)
    with torch.no_grad():
        np.testing.assert_allclose(fresh(torch.as_tensor(tokens)).logits.numpy(), ref, atol=1e-5)
