"""The attention and gpt_step benchmarks: FLOP counts against independent counts, the torch peer
computes the same attention (when installed), and rows are well formed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.bench import attention as bench
from zoo.bench import gpt_step
from zoo.models.gpt import GPTConfig, make_gpt


def test_attention_flops_count_the_two_matmuls():
    B, N, T, S, D = 2, 3, 5, 7, 4
    # q k^T: B*N*T*S dot products of length D; p v: B*N*T*D of length S; 2 FLOPs per multiply-add
    assert bench.attention_flops(B, N, T, S, D, False, False) == 2 * (B * N * T * S * D) * 2
    assert bench.attention_flops(B, N, T, S, D, True, True) == 0.5 * 3.5 * 4 * B * N * T * S * D


def test_bench_case_rows(monkeypatch):
    rows = bench.bench_case(1, 2, 64, 8, True, True, "float32", rounds=1,
                            impls=("zoo-auto", "zoo-chunked", "matmul-ceiling"))
    assert {r["impl"] for r in rows} == {"zoo-auto", "zoo-chunked", "matmul-ceiling"}
    assert all(r["unit"] == "GFLOP/s" and r["value"] > 0 for r in rows)


def test_torch_peer_computes_the_same_attention():
    torch = pytest.importorskip("torch")
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from zoo.ops.attention import dot_product_attention

    q, k, v, _ = bench._inputs(1, 2, 16, 8, "float32")
    ours = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), is_causal=True)
    t = lambda a: torch.as_tensor(a).transpose(1, 2)
    theirs = sdpa(t(q), t(k), t(v), is_causal=True).transpose(1, 2).numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5)


def test_gpt_model_flops_match_the_parameter_count():
    cfg = GPTConfig(vocab_size=64, max_len=32, num_layers=2, hidden=16, num_heads=2)
    params = jax.eval_shape(make_gpt(cfg).init, jax.random.key(0), {"x": jnp.zeros((1, 33), jnp.int32)})
    # matmul weights only: every 2-D kernel, plus the tied embedding used as the output layer
    n = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
            if jax.tree_util.keystr(path).endswith("['kernel']")) + 64 * 16
    assert gpt_step.model_flops_per_token(cfg, 32) == 6 * n + 12 * 2 * 16 * 32
