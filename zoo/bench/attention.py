"""Attention throughput: FLOP/s of `zoo.ops.attention.dot_product_attention`, forward and
forward+backward, for each implementation, beside PyTorch `scaled_dot_product_attention` and a
same-run matmul ceiling.

FLOPs (the FlashAttention papers' count): forward 4 * B * N * T * S * D (q k^T and p v), halved
when causal; forward+backward 3.5x the forward (the backward's five matmuls). GFLOP/s on a CPU,
TFLOP/s on an accelerator (the unit says which).

Implementations: `zoo-auto` (implementation=None: what users get; on a GPU its forwards are
`cudnn-direct` where zoo.ops.cudnn_direct builds, which the run prints), `zoo-xla`, `zoo-chunked`,
`zoo-blocked` and `zoo-native` (CPU only; native where it builds), `zoo-reference`, `zoo-cudnn`
(GPU only). Environment, for runs in
parts (benchmarks/device.sh, so that a kernel fault loses one part, not the run):
ZOO_ATTENTION_SKIP=zoo-xla,torch-sdpa-math,... leaves those rows out;
ZOO_ATTENTION_LENGTHS=1024,4096 and ZOO_ATTENTION_MASKS=full|causal keep those cases only;
ZOO_ATTENTION_DTYPE=float32|bfloat16 replaces the set's dtype (e.g. the quick set in bfloat16).
Peers, when torch is installed: `torch-sdpa` (PyTorch's own dispatch) and, on CUDA,
`torch-sdpa-flash|efficient|cudnn|math`, each only where it applies.
`matmul-ceiling`: the forward's two matmuls with no softmax between them, jitted; on CPU per head
and per tile of "blocked"'s forward walk (causal: the tiles on or below the diagonal), counted with
the same FLOPs as the attention they bound; on a GPU as batched matmuls over all heads, full (not
causal), counted with the full FLOPs: there the logits go through device memory, so it bounds
unfused attention only (fused kernels beat it: ~400 vs ~600 TFLOP/s on an H200). On a GPU a timed
call dispatches the same kernel `reps` times back to back (about 25 ms in all) and waits once; the
row's value is per kernel; kernels shorter than that run GPU_GROUP to a dispatch (one jitted
program for the zoo, one CUDA graph for PyTorch, each run on its own copy of the inputs, so that
neither side re-reads one set from the L2 cache: B4 N16 S1024 D128's q, k, v are 50 MB, the H200's
L2 60 MB), so short ones time the kernel, not Python's dispatch. Implementations are timed in
interleaved rounds so a drift in machine load hits all alike; the value is the median over rounds.
On a GPU each round runs them in a shuffled order, each call after an idle pause (GPU_PAUSE_S): the
H200's clock drops under sustained load, and in a fixed cyclic order a row's time depended on its
neighbour's. Each zoo row's `paired_vs` gives, for each PyTorch row, the median over rounds of the
two per-kernel times' ratio (zoo's speed over the peer's; steadier than a ratio of the two medians
on a noisy machine).

Quick (CPU): B1 N8 D64, S = T in {1024, 4096}, causal and not, float32, 7 rounds (zoo-reference,
zoo-xla and zoo-chunked at S1024 only).
Full (accelerator): B4 N16 D128, S in {1k, 4k, 8k, 16k}, causal and not, bfloat16.
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from zoo.bench import emit, interleaved_times, median_seconds, paired_speedup
from zoo.ops import native
from zoo.ops.attention import dot_product_attention
from zoo.ops.attention.blocked import _add_rows, _blocked_cfg, _rows, _scan_tiles

QUICK = dict(B=1, N=8, D=64, lengths=(1024, 4096), dtype="float32")
FULL = dict(B=4, N=16, D=128, lengths=(1024, 4096, 8192, 16384), dtype="bfloat16")
ZOO_IMPLS = ("zoo-auto", "zoo-xla", "zoo-chunked", "zoo-blocked", "zoo-native", "zoo-reference", "zoo-cudnn")
TORCH_BACKENDS = ("flash", "efficient", "cudnn", "math")
REFERENCE_MAX_S = 4096  # the reference materialises [B, N, T, S] logits twice with the backward


def attention_flops(B, N, T, S, D, causal, backward):
    f = 4.0 * B * N * T * S * D * (0.5 if causal else 1.0)
    return f * 3.5 if backward else f


def _inputs(B, N, S, D, dtype, seed=0):
    r = np.random.default_rng(seed)
    return [r.standard_normal((B, S, N, D)).astype(np.float32) for _ in range(4)]  # q, k, v, dout


def _zoo(impl, arrays, causal, backward, dtype):
    q, k, v, do = (jnp.asarray(a, dtype) for a in arrays)
    name = None if impl == "zoo-auto" else impl[len("zoo-"):]
    attn = lambda q, k, v: dot_product_attention(q, k, v, is_causal=causal, implementation=name)
    return _timed_jax(attn, q, k, v, do, backward)


def _timed_jax(attn, q, k, v, do, backward):
    if backward:
        one = lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do)
    else:
        one = lambda q, k, v, do: attn(q, k, v)
    f = jax.jit(one)
    return _repeat(lambda: f(q, k, v, do), grouped=lambda g: _jax_group(one, g, (q, k, v, do)))


def _jax_group(one, g, args):
    """A call of one jitted program that runs `one` on g copies of args (_jax_many)."""
    copies = [args] + [tuple(x * (1 + 2.0 ** -6 * i) for x in args) for i in range(1, g)]
    f = _jax_many(one, g)
    return lambda: f(*copies)


def _jax_many(one, g):
    """jit of `one` on each of g argument tuples, returning every output: distinct inputs, so XLA
    can merge none of the runs (an optimization barrier between runs on the same inputs did not
    stop XLA:CPU from computing them once), and no Python dispatch sits between the kernels."""
    def many(*arg_sets):
        assert len(arg_sets) == g
        return [one(*args) for args in arg_sets]

    return jax.jit(many)


def _repeat(call, grouped=None):
    """run(n=1): n calls dispatched back to back, then one wait (on a GPU a single short kernel
    would time mostly the dispatch and the synchronisation). grouped(g), where given, makes a call
    that runs the kernel g times (see GPU_GROUP): run.grouped(g) is the same run(n) over it."""
    def make(call):
        def run(n=1):
            out = None
            for _ in range(n):
                out = call()
            return jax.block_until_ready(out)
        return run

    run = make(call)
    if grouped is not None:
        run.grouped = lambda g: make(grouped(g))
    return run


def _ceiling(arrays, causal, backward, dtype):
    """The forward's two matmuls per tile of "blocked"'s walk (one tile per scan step, one head
    per loop step), nothing between them: what the matmuls alone cost at attention's shapes."""
    q, k, v, _ = (jnp.asarray(a, dtype) for a in arrays)
    T, S = q.shape[1], k.shape[1]
    cfg = _blocked_cfg(T, S, 1, causal, None)

    def head(qkv):
        q_TxD, k_SxD, v_SxD = qkv

        def step(o, t0, k0, rows, keys, edge):
            s = jnp.dot(_rows(q_TxD, t0, rows), _rows(k_SxD, k0, keys).T, preferred_element_type=jnp.float32)
            return _add_rows(o, t0, jnp.dot(s.astype(dtype), _rows(v_SxD, k0, keys),
                                            preferred_element_type=jnp.float32))

        return _scan_tiles(cfg.fwd, step, jnp.zeros(q_TxD.shape, jnp.float32))

    def two_matmuls(q, k, v):
        heads = [x.transpose(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3]) for x in (q, k, v)]
        return jax.lax.map(head, tuple(heads))

    f = jax.jit(two_matmuls)
    return _repeat(lambda: f(q, k, v))


def _ceiling_gpu(arrays, dtype, q_chunk=4096):
    """On an accelerator: the forward's two matmuls as batched (cuBLAS) matmuls over all heads,
    full (not causal), query chunks of q_chunk rows so the [B, N, chunk, S] logits stay a few GB."""
    q, k, v, _ = (jnp.asarray(a, dtype) for a in arrays)
    B, T, N, D = q.shape
    c = min(T, q_chunk)

    def two_matmuls(q, k, v):
        def one(q_c):
            s = jnp.einsum("bqnd,bknd->bnqk", q_c, k)
            return jnp.einsum("bnqk,bknd->bqnd", s, v)

        return jax.lax.map(one, q.reshape(B, T // c, c, N, D).swapaxes(0, 1))

    f = jax.jit(two_matmuls)
    return _repeat(lambda: f(q, k, v), grouped=lambda g: _jax_group(two_matmuls, g, (q, k, v)))


def _torch(backend, arrays, causal, backward, dtype):
    """PyTorch SDPA on inputs in its own layout [B, N, S, D] (on the 2026-11-27 H200 its cuDNN
    kernels ran at the same speed on [B, N, S, D] views of the zoo's [B, S, N, D] memory, and JAX's
    on either layout: benchmarks/scripts/attention_plans.py)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = getattr(torch, dtype)
    q, k, v, do = (torch.as_tensor(a, device=dev).to(tdtype).transpose(1, 2).contiguous() for a in arrays)
    if backward:
        for t in (q, k, v):
            t.requires_grad_(True)
    ctx = (lambda: sdpa_kernel(getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                                                    "cudnn": "CUDNN_ATTENTION", "math": "MATH"}[backend]))
           ) if backend else None

    def call_on(q, k, v, do):
        out = sdpa(q, k, v, is_causal=causal)
        if backward:
            out.backward(do)
        return out

    def run(n=1):
        with (ctx() if ctx else contextlib.nullcontext()):
            for _ in range(n):
                out = call_on(q, k, v, do)
        if dev == "cuda":
            torch.cuda.synchronize()
        return out

    def grouped(g):  # g distinct input sets, as _jax_group's: neither side re-reads one set from L2
        copies = [(q, k, v, do)] + [tuple((t.detach() * (1 + 2.0 ** -6 * i)).requires_grad_(t.requires_grad)
                                          for t in (q, k, v, do)) for i in range(1, g)]
        return _torch_graph(torch, [functools.partial(call_on, *c) for c in copies], ctx)

    if dev == "cuda":
        run.grouped = grouped
    return run


def _torch_graph(torch, calls, ctx):
    """run(n=1) replaying a CUDA graph of the calls back to back n times, then one synchronise:
    PyTorch's counterpart of _jax_group (no Python dispatch between the kernels). The capture
    follows torch.cuda.graph's recipe: warm up on a side stream, then capture."""
    with (ctx() if ctx else contextlib.nullcontext()):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                for call in calls:
                    call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()

    def run(n=1):
        for _ in range(n):
            graph.replay()
        torch.cuda.synchronize()

    return run


def _makers(on_gpu, S):
    makers = {}
    skip = set(filter(None, os.environ.get("ZOO_ATTENTION_SKIP", "").split(",")))
    for impl in ZOO_IMPLS:
        if (impl == "zoo-cudnn" and not on_gpu) or (impl in ("zoo-blocked", "zoo-native") and on_gpu):
            continue  # CPU paths: on a GPU "blocked" would only time XLA's loops; "native" is C++
        if impl == "zoo-native" and not native.available():
            continue  # no C++ compiler here: auto runs "blocked"
        if impl == "zoo-reference" and S > REFERENCE_MAX_S:
            continue
        makers[impl] = lambda a, c, b, d, impl=impl: _zoo(impl, a, c, b, d)
    try:
        import torch  # noqa: F401

        makers["torch-sdpa"] = lambda a, c, b, d: _torch(None, a, c, b, d)
        if on_gpu:
            for backend in TORCH_BACKENDS:
                if backend == "math" and S > REFERENCE_MAX_S:
                    continue  # materialises the logits like the reference
                makers[f"torch-sdpa-{backend}"] = lambda a, c, b, d, backend=backend: _torch(backend, a, c, b, d)
    except ImportError:
        pass
    if on_gpu:
        makers["matmul-ceiling"] = lambda a, c, b, d: _ceiling_gpu(a, d)
    else:
        makers["matmul-ceiling"] = lambda a, c, b, d: _ceiling(a, c, b, d)
    return {impl: make for impl, make in makers.items() if impl not in skip}


# Before each timed call on a GPU: an idle pause, so that no row inherits the clock its predecessor
# left. The H200's SM clock moved between 1500 and 1980 MHz under this benchmark's load (2026-11-27),
# and in rotated rounds the same PyTorch cuDNN kernel ran up to 13% faster as the row after PyTorch's
# flash row than as the row after the zoo's; attention_dispatch.py, timing only cuDNN attentions in
# one process, found the zoo's and PyTorch's forward equal (S4096 0.955 vs 0.955 ms per call).
GPU_PAUSE_S = 0.1
GPU_CALL_S = 0.025  # on a GPU a timed call repeats the kernel until it lasts about this long
# On a GPU, kernels that need more than one repetition run GPU_GROUP (or fewer) to a dispatch: one
# jitted program with the runs in sequence for the zoo, one CUDA graph for PyTorch. Dispatched one
# by one from Python, a ~15 us kernel (S1024 forward, B4 N16 D128 on an H200) times the dispatch:
# the first lent H200 gave the zoo's cuDNN forward 0.63-0.83x PyTorch's there and 0.91-1.01x from
# S4096 on. Grouped, both sides time their kernels; a user's attention sits inside a jitted model.
GPU_GROUP = 10
# ... and only kernels whose single call (dispatch, kernel, synchronise) is shorter than this: a
# longer kernel hides the next dispatch behind it anyway. (The second lent H200, 2026-11-26: with
# every repeated kernel grouped, the run died at S4096 causal with an illegal memory access in a
# CUDA-graph replay, after the grouped S1024 cases had run.)
GPU_GROUP_BELOW_S = 3e-4
# the slow unfused paths (>= ~100 us even at S1024, so asynchronous dispatch already hides Python's
# share): grouping them would only add compile time (g copies each) to a run with a time limit
UNGROUPED = ("zoo-xla", "zoo-chunked", "zoo-reference", "torch-sdpa-math")


def _grouped(impl, fn, n, call_s=0.0):
    """(run, group, dispatches) for n repetitions of fn: grouped by up to GPU_GROUP where fn can
    be, n > 1 and one call took call_s < GPU_GROUP_BELOW_S, else fn itself (also where building
    the group fails, e.g. a CUDA graph capture the backend does not allow: said in the log, and
    the row's group is 1)."""
    g = min(GPU_GROUP, n)
    if g <= 1 or not hasattr(fn, "grouped") or impl in UNGROUPED or call_s >= GPU_GROUP_BELOW_S:
        return fn, 1, n
    try:
        run = fn.grouped(g)
        run()  # compile / capture, and check that it runs
    except Exception as e:  # noqa: BLE001
        print(f"  {impl}: ungrouped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return fn, 1, n
    return run, g, -(-n // g)


def _repeated(fns, call_s):
    """({impl: run(n)... as a call of no arguments}, reps, groups) on a GPU: each fn repeated to
    ~GPU_CALL_S per timed call, and grouped (_grouped) where the case is short, decided once for
    the case, from its fastest groupable call: a noisy first call of one row must not leave that
    row dispatched one by one while its peers run grouped (the seventh lent H200, 2026-11-27: the
    zoo's S1024 forwards went ungrouped, 101 vs 60 us per call, against 74 vs 60 grouped in the
    same lease)."""
    groupable = [t for impl, t in call_s.items() if hasattr(fns[impl], "grouped") and impl not in UNGROUPED]
    short = min(groupable, default=GPU_GROUP_BELOW_S) < GPU_GROUP_BELOW_S
    out, reps, groups = {}, {}, {}
    for impl, fn in fns.items():
        n = int(min(200, max(1, round(GPU_CALL_S / call_s[impl]))))
        fn, groups[impl], n = _grouped(impl, fn, n, 0.0 if short else GPU_GROUP_BELOW_S)
        reps[impl] = n * groups[impl]
        out[impl] = functools.partial(fn, n)
    return out, reps, groups


XLA_GPU_MAX_LOGITS = 40 * 2**30  # bytes of f32 logits (x3 with the backward) past which "xla" is skipped


def bench_case(B, N, S, D, causal, backward, dtype, *, rounds=5, impls=None) -> list[dict]:
    on_gpu = jax.default_backend() == "gpu"
    arrays = _inputs(B, N, S, D, dtype)
    fns = {}
    for impl, make in _makers(on_gpu, S).items():
        if impls is not None and impl not in impls:
            continue
        logits = 4 * B * N * S * S * (3 if backward else 1)
        if on_gpu and impl == "zoo-xla" and logits > XLA_GPU_MAX_LOGITS:
            # measured on an H200 (2026-11-25): out of memory from S8192 fwd+bwd, after a long autotune
            print(f"  skip {impl}: {logits / 2**30:.0f} GiB of f32 logits (out of memory)")
            continue
        try:  # the ceiling is a forward; its FLOP/s bounds both directions
            fn = make(arrays, causal, backward and impl != "matmul-ceiling", dtype)
            fn()  # compile / warm up; an implementation that does not apply here is skipped
        except Exception as e:  # noqa: BLE001 (a peer backend that does not apply, or out of memory)
            print(f"  skip {impl}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        fns[impl] = fn
    if on_gpu:  # repeat short kernels so a timed call is ~GPU_CALL_S, not dispatch + sync
        call_s = {impl: min(median_seconds(fn, warmup=0, iters=1) for _ in range(3))  # the first may be slow
                  for impl, fn in fns.items()}
        fns, reps, groups = _repeated(fns, call_s)
    else:
        reps = groups = dict.fromkeys(fns, 1)
    if on_gpu:  # a pause and a shuffled order: each call starts from an idle GPU's clock (GPU_PAUSE_S)
        times = interleaved_times(fns, rounds, pause_s=GPU_PAUSE_S, order="shuffle")
    else:
        times = interleaved_times(fns, rounds, pause_s=0.05, warm_below_s=0.25)
    scale, unit = (1e12, "TFLOP/s") if on_gpu else (1e9, "GFLOP/s")
    case = f"B{B}-N{N}-S{S}-D{D}-{dtype}-{'causal' if causal else 'full'}-{'fwd+bwd' if backward else 'fwd'}"
    rows = []
    for impl, t in times.items():
        ceiling = impl == "matmul-ceiling"
        # the GPU ceiling runs the full (not causal) matmuls and counts their FLOPs
        flops = attention_flops(B, N, S, S, D, causal and not (ceiling and on_gpu), backward and not ceiling)
        sec = statistics.median(t) / reps[impl]
        row = {"case": case, "impl": impl, "value": flops / sec / scale, "unit": unit,
               "median_s": sec, "reps": reps[impl], "group": groups[impl]}
        if impl.startswith("zoo-"):  # per-kernel time ratios, round by round, to each PyTorch row
            row["paired_vs"] = {peer: paired_speedup([x / reps[impl] for x in t], [x / reps[peer] for x in tp])
                                for peer, tp in times.items() if peer.startswith("torch-")}
        rows.append(row)
    if on_gpu:
        _free_torch_cache()
    return emit(rows)


def _free_torch_cache():
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # JAX allocates without preallocation; leave it the room


def _selected(lengths):
    """(lengths, causal flags) to run: all, or those ZOO_ATTENTION_LENGTHS / _MASKS name."""
    want = os.environ.get("ZOO_ATTENTION_LENGTHS", "").strip()
    if want:
        try:
            picked = tuple(int(x) for x in want.split(","))
        except ValueError:
            raise ValueError(f"ZOO_ATTENTION_LENGTHS={want!r}: expected a comma list of lengths, "
                             f"e.g. {','.join(map(str, lengths))}") from None
        unknown = sorted(set(picked) - set(lengths))
        if unknown:
            raise ValueError(f"ZOO_ATTENTION_LENGTHS: {unknown} not among this run's lengths {list(lengths)}")
        lengths = picked
    mask = os.environ.get("ZOO_ATTENTION_MASKS", "").strip()
    if mask not in ("", "full", "causal"):
        raise ValueError(f"ZOO_ATTENTION_MASKS={mask!r}: expected full or causal (or unset: both)")
    return lengths, {"": (False, True), "full": (False,), "causal": (True,)}[mask]


def _dtype(default):
    """The set's dtype, or the one ZOO_ATTENTION_DTYPE names."""
    dtype = os.environ.get("ZOO_ATTENTION_DTYPE", "").strip()
    if dtype not in ("", "float32", "bfloat16"):
        raise ValueError(f"ZOO_ATTENTION_DTYPE={dtype!r}: expected float32 or bfloat16 (or unset)")
    return dtype or default


QUICK_ROUNDS = 7
QUICK_LONG_SKIP = {"zoo-reference", "zoo-xla", "zoo-chunked"}


def run(quick: bool) -> list[dict]:
    spec = dict(QUICK if quick else FULL)
    lengths, masks = _selected(spec["lengths"])
    spec["dtype"] = _dtype(spec["dtype"])
    rows = []
    if jax.default_backend() == "gpu":  # what zoo-auto's forward rows run (see zoo.ops.cudnn_direct)
        from zoo.ops import cudnn_direct

        why_not = cudnn_direct.chosen_by_auto()
        print(f"  zoo-auto's forwards: {'cudnn' if why_not else 'cudnn-direct'}"
              f"{' (cudnn-direct: ' + why_not.splitlines()[0] + ')' if why_not else ''}", flush=True)
    for S in lengths:
        for causal in masks:
            for backward in (False, True):
                # quick: the unfused implementations (full logits or key blocks through memory,
                # 10-40 GFLOP/s on CPU) only at the short length, and their time spent on more
                # rounds of the rest: on the 2-core CI machine one S4096 call of the same program
                # varies by +-15% between rounds, so a median of 3 could not tell 0.8x from 0.9x
                skip = QUICK_LONG_SKIP if quick and S > QUICK["lengths"][0] else set()
                impls = [i for i in _makers(jax.default_backend() == "gpu", S) if i not in skip]
                rounds = QUICK_ROUNDS if quick else 3 if S > 4096 else 5
                rows += bench_case(spec["B"], spec["N"], S, spec["D"], causal, backward, spec["dtype"],
                                   rounds=rounds, impls=impls)
                print(f"  done S={S} causal={causal} backward={backward}", flush=True)
    return rows
