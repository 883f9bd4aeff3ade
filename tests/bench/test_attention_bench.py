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
    assert all(r["paired_vs"] == {} for r in rows if r["impl"].startswith("zoo-"))  # no PyTorch row here


@pytest.mark.parametrize("backward", [False, True])
def test_grouped_zoo_call_runs_every_kernel(backward):
    """The GPU harness's group of g kernels per dispatch: the first run gives the values of one
    call, and the compiled program really holds g attentions (XLA merged none of them): g times
    the FLOPs of one call by XLA's own cost analysis."""
    arrays = bench._inputs(1, 2, 16, 8, "float32")
    run = bench._zoo("zoo-xla", arrays, True, backward, "float32")
    single, group = run.grouped(1)(), run.grouped(3)()
    assert len(group) == 3
    for a, b in zip(jax.tree.leaves(group[0]), jax.tree.leaves(single[0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    args = tuple(jnp.asarray(a) for a in arrays)
    attn = lambda q, k, v: bench.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    f = (lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do)) if backward else (lambda q, k, v, do: attn(q, k, v))

    def flops(g):
        cost = bench._jax_many(f, g).lower(*[args] * g).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    assert flops(1) > 0 and flops(3) == pytest.approx(3 * flops(1))


def test_grouping_falls_back_to_single_dispatch():
    calls = []
    plain = lambda n=1: calls.append(n)  # noqa: E731
    assert bench._grouped("x", plain, 7) == (plain, 1, 7)  # nothing to group with

    def broken(g):
        raise RuntimeError("capture not allowed")
    plain.grouped = broken
    assert bench._grouped("x", plain, 7) == (plain, 1, 7)
    assert bench._grouped("x", plain, 1) == (plain, 1, 1)
    ok = lambda n=1: None  # noqa: E731
    ok.grouped = lambda g: (lambda n=1: calls.append(("group", g, n)))
    assert bench._grouped("zoo-chunked", ok, 25) == (ok, 1, 25)  # a slow path: not worth g compiles
    assert bench._grouped("x", ok, 25, bench.GPU_GROUP_BELOW_S) == (ok, 1, 25)  # hides its dispatch
    run, g, n = bench._grouped("x", ok, 25)
    assert (g, n) == (bench.GPU_GROUP, 3) and calls[-1] == ("group", bench.GPU_GROUP, 1)


def test_grouping_is_decided_once_per_case():
    """A short case groups every groupable row, also one whose own first calls were slow (the
    seventh lent H200: the zoo's S1024 forward at 101 us per call ungrouped, its peer grouped);
    a long case groups none. Each row still repeats to ~GPU_CALL_S by its own call time."""
    log = []

    def row(name):
        f = lambda n=1: log.append((name, 1, n))  # noqa: E731
        f.grouped = lambda g: (lambda n=1: log.append((name, g, n)))
        return f
    slow = lambda n=1: log.append(("zoo-chunked", 1, n))  # noqa: E731
    slow.grouped = lambda g: None
    fns = {"zoo-auto": row("zoo-auto"), "torch-sdpa-cudnn": row("torch-sdpa-cudnn"), "zoo-chunked": slow}
    call_s = {"zoo-auto": 4e-4, "torch-sdpa-cudnn": 6e-5, "zoo-chunked": 2e-3}
    fns_out, reps, groups = bench._repeated(fns, call_s)
    assert groups == {"zoo-auto": bench.GPU_GROUP, "torch-sdpa-cudnn": bench.GPU_GROUP, "zoo-chunked": 1}
    n = {impl: min(200, round(bench.GPU_CALL_S / t)) for impl, t in call_s.items()}  # at most 200
    assert reps == {"zoo-auto": -(-n["zoo-auto"] // bench.GPU_GROUP) * bench.GPU_GROUP,
                    "torch-sdpa-cudnn": -(-n["torch-sdpa-cudnn"] // bench.GPU_GROUP) * bench.GPU_GROUP,
                    "zoo-chunked": n["zoo-chunked"]}
    log.clear()
    fns_out["zoo-auto"]()
    assert log[-1] == ("zoo-auto", bench.GPU_GROUP, reps["zoo-auto"] // bench.GPU_GROUP)
    long = {impl: 3 * bench.GPU_GROUP_BELOW_S for impl in fns}
    _, reps, groups = bench._repeated({impl: row(impl) for impl in fns}, long)
    assert set(groups.values()) == {1} and set(reps.values()) == {round(bench.GPU_CALL_S / long["zoo-auto"])}


def test_torch_peer_computes_the_same_attention():
    torch = pytest.importorskip("torch")
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from zoo.ops.attention import dot_product_attention

    q, k, v, _ = bench._inputs(1, 2, 16, 8, "float32")
    ours = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), is_causal=True)
    t = lambda a: torch.as_tensor(a).transpose(1, 2)
    theirs = sdpa(t(q), t(k), t(v), is_causal=True).transpose(1, 2).numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5)
    out = bench._torch(None, [q, k, v, q], True, False, "float32")()  # the bench's row
    np.testing.assert_allclose(out.transpose(1, 2).numpy(), np.asarray(ours), atol=1e-5)


def test_gpt_model_flops_match_the_parameter_count():
    cfg = GPTConfig(vocab_size=64, max_len=32, num_layers=2, hidden=16, num_heads=2)
    params = jax.eval_shape(make_gpt(cfg).init, jax.random.key(0), {"x": jnp.zeros((1, 33), jnp.int32)})
    # matmul weights only: every 2-D kernel, plus the tied embedding used as the output layer
    n = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(params)
            if jax.tree_util.keystr(path).endswith("['kernel']")) + 64 * 16
    assert gpt_step.model_flops_per_token(cfg, 32) == 6 * n + 12 * 2 * 16 * 32


def test_case_selection_from_the_environment(monkeypatch):
    lengths = bench.FULL["lengths"]
    assert bench._selected(lengths) == (lengths, (False, True))
    monkeypatch.setenv("ZOO_ATTENTION_LENGTHS", "4096,1024")
    monkeypatch.setenv("ZOO_ATTENTION_MASKS", "causal")
    assert bench._selected(lengths) == ((4096, 1024), (True,))
    monkeypatch.setenv("ZOO_ATTENTION_MASKS", "full")
    assert bench._selected(lengths)[1] == (False,)
    monkeypatch.setenv("ZOO_ATTENTION_MASKS", "sliding")
    with pytest.raises(ValueError, match="full or causal"):
        bench._selected(lengths)
    monkeypatch.setenv("ZOO_ATTENTION_MASKS", "")
    monkeypatch.setenv("ZOO_ATTENTION_LENGTHS", "2048")
    with pytest.raises(ValueError, match=r"\[2048\] not among"):
        bench._selected(lengths)
    monkeypatch.setenv("ZOO_ATTENTION_LENGTHS", "4k")
    with pytest.raises(ValueError, match="comma list"):
        bench._selected(lengths)
    assert bench._dtype("float32") == "float32"
    monkeypatch.setenv("ZOO_ATTENTION_DTYPE", "bfloat16")
    assert bench._dtype("float32") == "bfloat16"
    monkeypatch.setenv("ZOO_ATTENTION_DTYPE", "fp8")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        bench._dtype("float32")


def test_gpt_step_run_selection(monkeypatch):
    runs, more = gpt_step.FULL["runs"], gpt_step.FULL["more"]
    assert gpt_step.selected_runs(runs, more) == runs and (64, None) not in runs  # `more` only when named
    monkeypatch.setenv("ZOO_GPT_STEP_RUNS", "64, 64-bf16-logits-gelu-sigmoid,64-bf16-logits")
    assert gpt_step.selected_runs(runs, more) == ((64, gpt_step.BF16_LOGITS), (64, gpt_step.GELU_SIGMOID),
                                                  (64, None))  # FULL's order
    monkeypatch.setenv("ZOO_GPT_STEP_RUNS", "64-bf16-logits-qkv-separate")
    assert gpt_step.selected_runs(runs, more) == ((64, gpt_step.QKV_SEPARATE),)
    monkeypatch.setenv("ZOO_GPT_STEP_RUNS", "32")
    with pytest.raises(ValueError, match=r"\['32'\] not among.*64-bf16-logits"):
        gpt_step.selected_runs(runs, more)


def test_gpt_step_run_options_reach_the_step_compile(monkeypatch):
    """A run's third element (XLA compiler options: the -cublas run's Triton GEMMs off) goes to
    its step's compile, and to its alone; an option XLA does not know fails that compile."""
    from zoo.models.gpt import GPTConfig

    seen = []
    monkeypatch.setattr(gpt_step, "step_rows", lambda cfg, B, **kw: seen.append(kw.get("compiler_options")) or [])
    monkeypatch.setitem(gpt_step.QUICK, "runs", ((8, ("a", {})), (8, ("b", {}, {"xla_x": False})), (8, None)))
    gpt_step.run(quick=True)
    assert seen == [None, {"xla_x": False}, None]
    cublas = {v[0]: v for _, v in gpt_step.FULL["runs"] if v and v[0].endswith("-cublas")}
    best, every = gpt_step.SEPARATE_EPILOGUE_LN_LSE, gpt_step.ALL_KERNELS
    lt = "-gelu-grad-cublaslt-qkv-grad-cublaslt-cublas"
    assert list(cublas) == [every[0] + lt, best[0] + lt, best[0] + "-gelu-grad-cublaslt-cublas", best[0] + "-cublas"]
    assert all(v[2] == {"xla_gpu_enable_triton_gemm": False} for v in cublas.values())
    assert cublas[best[0] + "-cublas"][1] == best[1]
    assert cublas[best[0] + "-gelu-grad-cublaslt-cublas"][1] == dict(best[1], gelu_grad="cublaslt")
    assert cublas[best[0] + lt][1] == dict(best[1], gelu_grad="cublaslt", qkv_grad="cublaslt")
    assert cublas[every[0] + lt][1] == dict(best[1], xent="fused", gelu_grad="cublaslt", qkv_grad="cublaslt")
    monkeypatch.undo()
    tiny = GPTConfig(vocab_size=32, max_len=8, num_layers=1, hidden=16, num_heads=2)
    with pytest.raises(Exception, match="xla_no_such_option"):
        gpt_step.step_rows(tiny, 2, iters=1, compiler_options={"xla_no_such_option": True})


def test_gpt_step_out_of_memory_loses_only_its_rows(monkeypatch, capsys):
    def fake(cfg, B, **kw):
        if B == 64:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0GiB")
        return [{"B": B}]
    monkeypatch.setattr(gpt_step, "step_rows", fake)
    monkeypatch.setitem(gpt_step.QUICK, "runs", ((8, None), (64, None), (16, None)))
    assert gpt_step.run(quick=True) == [{"B": 8}, {"B": 16}]
    assert "skip B64" in capsys.readouterr().out
    monkeypatch.setattr(gpt_step, "step_rows", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # anything else is not swallowed
        gpt_step.run(quick=True)


def test_gpt_step_failing_run_loses_only_its_rows(monkeypatch, capsys):
    """A run that fails otherwise (say a kernel that does not compile on the device) is reported
    with its traceback, the runs after it still run and keep their rows, and its error is raised
    at the end (the benchmark's exit says it failed)."""
    done = []

    def fake(cfg, B, **kw):
        if B == 64:
            raise ValueError("Triton lowering failed: num_warps 32")
        done.append(B)
        return [{"B": B}]
    monkeypatch.setattr(gpt_step, "step_rows", fake)
    monkeypatch.setitem(gpt_step.QUICK, "runs", ((8, None), (64, None), (16, None)))
    with pytest.raises(ValueError, match="Triton lowering failed"):
        gpt_step.run(quick=True)
    assert done == [8, 16]
    out = capsys.readouterr()
    assert "FAILED B64 : ValueError: Triton lowering failed: num_warps 32" in out.out
    assert "Traceback" in out.err


def test_skip_list_leaves_any_row_out(monkeypatch):
    monkeypatch.setenv("ZOO_ATTENTION_SKIP", "zoo-xla,matmul-ceiling,torch-sdpa")
    makers = bench._makers(False, 1024)
    assert not {"zoo-xla", "matmul-ceiling", "torch-sdpa"} & set(makers)
    assert {"zoo-auto", "zoo-chunked", "zoo-blocked"} <= set(makers)


def test_gpt_step_rows_carry_the_first_losses():
    """A tiny step's rows: throughput and MFU against the same-run ceiling, and the first three
    steps' losses on the one fixed batch (a variant that changed the numerics would show there):
    from about log(V) at init, falling as the step trains on that batch."""
    cfg = GPTConfig(vocab_size=64, max_len=16, num_layers=1, hidden=32, num_heads=2)
    gpt_step._CEILINGS.clear()  # a run measures the ceiling once, with its first rows
    rows = gpt_step.step_rows(cfg, 2, iters=2)
    step, pipelined, ceiling = rows
    assert step["impl"] == "zoo-train-step" and pipelined["impl"] == "zoo-train-step-pipelined"
    assert ceiling["impl"] == "matmul-ceiling" and 0 < step["mfu"] < 1
    first = step["first_losses"]
    assert len(first) == 3 and abs(first[0] - np.log(64)) < 0.2 and first[0] > first[1] > first[2]


def test_zoo_rows_carry_paired_ratios_to_each_torch_row():
    pytest.importorskip("torch")
    rows = bench.bench_case(1, 2, 64, 16, False, False, "float32", rounds=3, impls=("zoo-auto", "torch-sdpa"))
    by = {r["impl"]: r for r in rows}
    assert set(by["zoo-auto"]["paired_vs"]) == {"torch-sdpa"} and "paired_vs" not in by["torch-sdpa"]
    assert 0 < by["zoo-auto"]["paired_vs"]["torch-sdpa"] < float("inf")
