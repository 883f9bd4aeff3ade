"""GPT train-step throughput: tokens/s and model-FLOPs utilisation (MFU) of the loop's own jitted
train step (forward, backward, AdamW) on a device-resident batch of random tokens.

Model FLOPs per token (Kaplan et al. 2020, Table 1; the PaLM paper's MFU, App. B):
6 * N + 12 * L * H * T, with N the non-embedding parameters plus the tied output layer
(V * H, a real matmul) and T the sequence length; counted for T-length causal attention in full,
as PaLM does. MFU = model FLOPs/s over the device's peak: H100 SXM 989 TFLOP/s dense bf16, H200
the same, A100 312 (table below). On a CPU there is no spec-sheet peak worth quoting, so the row
`matmul-ceiling` measures one in the same run: a square float32 matmul of the model's width
class, and `mfu` is model FLOP/s over that.

Two rows per batch: `zoo-train-step` waits for each step's metrics before dispatching the next
(the device idles while Python dispatches), `zoo-train-step-pipelined` dispatches the steps back to
back and waits once, so dispatch overlaps the device's work, as in the training loop, which reads
each step's metrics only after dispatching the next (zoo/train/loop.py).

Full (accelerator): GPT-2 124M (L12 H768 12 heads, V 50304 = 50257 padded to a multiple of 64,
T 1024), bf16 compute with float32 params, at B64 with the variant `bf16-logits`
(GPTConfig.f32_logits=False: bf16 logits and logit gradients, as PyTorch autocast's, for half the
traffic over the [B * T, V] logits; an H200, 2026-11-26: 46.8% MFU pipelined at B64, the default
45.8%; B16, measured on three leases, reached 43.4%; B128 ran out of memory on the H200). In
this order: `bf16-logits-qkv-separate-gelu-epilogue-ln-pallas-lse-pallas` (the fastest measured:
46.9% MFU, H200 2026-11-27); the same with every kernel of the zoo's and XLA's Triton GEMMs off
for its compile (`...-lse-pallas-xent-fused-gelu-grad-cublaslt-qkv-grad-cublaslt-cublas`: the
output layer inside the loss, GPTConfig.xent "fused"; the MLP's GELU backward in cuBLASLt's
DGELU_BGRAD epilogue, GPTConfig.gelu_grad "cublaslt", zoo.ops.cublaslt; the q/k/v projections'
weight and bias gradients in one cuBLASLt matmul each, GPTConfig.qkv_grad "cublaslt"; see
NO_TRITON_GEMM: nearest 50% MFU by the estimates of benchmarks/scripts/gpt_step_hlo.py); the
same without xent fused (`...-lse-pallas-gelu-grad-cublaslt-qkv-grad-cublaslt-cublas`); the
PyTorch peer (below); then without qkv_grad (`...-gelu-grad-cublaslt-cublas`), the first with
Triton GEMMs off alone (`...-cublas`), the first with gelu_grad "cublaslt" alone, then
`bf16-logits-qkv-separate-gelu-epilogue-ln-pallas-lse-pallas-xent-fused`, with GPTConfig.qkv
"separate", GPTConfig.gelu "epilogue" (the GELU in the fc matmul's cuBLASLt epilogue),
GPTConfig.layer_norm "pallas" (each residual add inside the next layer norm's Triton kernel),
GPTConfig.logsumexp "pallas" (the loss's logsumexp in one Triton pass over the logits) and
GPTConfig.xent "fused" (the output layer inside the loss: that kernel writes the logits' gradient
too, and the backward never reads the logits), `bf16-logits-auto` (GPTConfig's defaults, the
Pallas layer norm and logsumexp on an NVIDIA GPU, with bf16 logits), and `bf16-logits` (the
runs' base pins the kernels off): a lease's time limit cuts the last.
Timed only when ZOO_GPT_STEP_RUNS names them (e.g. ZOO_GPT_STEP_RUNS=64-bf16-logits,64-bf16-logits-gelu-sigmoid):
`bf16-logits-qkv-separate-gelu-epilogue` (without the Pallas kernels),
`...-xent-fused-gelu-grad-pallas` (GPTConfig.gelu_grad "pallas", the GELU's backward inside the
proj matmul's, one Triton kernel: 10% slower, H200 2026-11-27),
`bf16-logits-lse-pallas-xent-fused`, `bf16-logits-qkv-separate-gelu-epilogue-ln-pallas`, `bf16-logits-lse-pallas`,
`bf16-logits-gelu-epilogue`, `bf16-logits-ln-pallas`, `bf16-logits-qkv-separate` alone
and with the sigmoid GELU (`...-gelu-sigmoid`), `bf16-logits-gelu-sigmoid`,
`bf16-logits-qkv-split-grad` (GPTConfig.qkv "fused-split-grad") alone and with the sigmoid GELU,
PyTorch eager (`64-torch`) and `64` (the default config, f32 logits), and at B128
`128-bf16-logits`, `128-bf16-logits-qkv-separate-gelu-epilogue-ln-pallas-lse-pallas`, the same
without `-lse-pallas`, `128-bf16-logits-qkv-separate-gelu-epilogue` and `...-gelu-sigmoid` (61.6 GiB
of temporaries: run them in a process of their own, as the first runs, so that allocation finds
the memory free).
benchmarks/scripts/gpt_step_hlo.py compiles these runs for an H200 without one and counts what
each moves.
Quick (CPU): L4 H256 8 heads, V 256, T 256, batch 8, float32.

The peer, when torch is installed: the same model and step in PyTorch as nanoGPT writes it
(zoo.bench.torch_gpt: bf16 autocast, SDPA, fused AdamW; its weights are the zoo's init), rows
`torch-nanogpt-compiled` (torch.compile; CUDA, full set) and `torch-nanogpt` eager (quick set,
and when named), each synced and pipelined, with MFU counted as the zoo's. It runs fourth (a
lease's limit cut it when it ran last; a slow compile or an out-of-memory loses its own rows
only), and hands its cached GPU memory back when done.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from zoo.bench import emit, median_seconds, profile
from zoo.models.gpt import GPTConfig, make_gpt
from zoo.train.state import init_state
from zoo.train.strategy import make_train_step

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}
LR, WEIGHT_DECAY = 3e-4, 0.1  # AdamW, both sides
BF16_LOGITS = ("bf16-logits", dict(f32_logits=False))
# the q/k/v projections' backward per projection, or three matmuls (GPTConfig.qkv): the fused
# default's backward concatenates the three gradients twice per layer (3.4 ms of 114.6, H200
# 2026-11-27), the other two never do
QKV_SPLIT_GRAD = ("bf16-logits-qkv-split-grad", dict(f32_logits=False, qkv="fused-split-grad"))
QKV_SEPARATE = ("bf16-logits-qkv-separate", dict(f32_logits=False, qkv="separate"))
# the MLP's GELU as h * sigmoid(2z) with its derivative in closed form (GPTConfig.gelu): the tanh
# form's two fusions ran arithmetic-bound (8.7 ms of 114.6, H200 2026-11-27); the next lease: 1.14x
# the tanh form's forward alone, 119.9 ms of kernels per step to bf16-logits' 121.4
GELU_SIGMOID = ("bf16-logits-gelu-sigmoid", dict(f32_logits=False, gelu="sigmoid"))
# the two that took the most off the step's kernel time on that lease, together
SPLIT_GRAD_SIGMOID = ("bf16-logits-qkv-split-grad-gelu-sigmoid",
                      dict(f32_logits=False, qkv="fused-split-grad", gelu="sigmoid"))
# separate q/k/v projections, since their bias adds fold into cuBLASLt's epilogue (zoo.ops.linear.
# add_bias), the fewest bytes moved of the qkv modes (the step compiled for an H200, 2026-11-27:
# 92.2 GB of fusions and copies to the fused projection's 104.3; gpt_step_hlo.py), with the
# sigmoid GELU
SEPARATE_SIGMOID = ("bf16-logits-qkv-separate-gelu-sigmoid",
                    dict(f32_logits=False, qkv="separate", gelu="sigmoid"))
# the MLP's GELU in the fc matmul's cuBLASLt epilogue (GPTConfig.gelu "epilogue",
# zoo.ops.gelu.gelu_epilogue): no GELU forward pass (the step compiled for an H200,
# 2026-11-27: 9.7 GB fewer bytes in fusions, 4.8 GB more written by the fc matmuls), alone and
# with separate q/k/v (the fewest bytes of all: 82.5 GB + 4.8 to bf16-logits' 104.3)
GELU_EPILOGUE = ("bf16-logits-gelu-epilogue", dict(f32_logits=False, gelu="epilogue"))
SEPARATE_EPILOGUE = ("bf16-logits-qkv-separate-gelu-epilogue",
                     dict(f32_logits=False, qkv="separate", gelu="epilogue"))
# each residual add inside the next layer norm, one Pallas (Triton) kernel each way
# (GPTConfig.layer_norm "pallas", zoo.ops.layer_norm): alone and with the two above
LN_PALLAS = ("bf16-logits-ln-pallas", dict(f32_logits=False, layer_norm="pallas"))
SEPARATE_EPILOGUE_LN = ("bf16-logits-qkv-separate-gelu-epilogue-ln-pallas",
                        dict(f32_logits=False, qkv="separate", gelu="epilogue", layer_norm="pallas"))
# the loss's logsumexp in one Pallas (Triton) pass over the logits (GPTConfig.logsumexp "pallas",
# zoo.ops.logsumexp; jax.nn.logsumexp's two passes took 1.7 + 2.2 ms, H200 2026-11-26): alone and
# with the three above
LSE_PALLAS = ("bf16-logits-lse-pallas", dict(f32_logits=False, logsumexp="pallas"))
SEPARATE_EPILOGUE_LN_LSE = ("bf16-logits-qkv-separate-gelu-epilogue-ln-pallas-lse-pallas",
                            dict(f32_logits=False, qkv="separate", gelu="epilogue", layer_norm="pallas",
                                 logsumexp="pallas"))
# the output layer and the loss as one op (GPTConfig.xent "fused", zoo.ops.losses.
# linear_cross_entropy): with the Pallas logsumexp, one kernel reads the logits and writes their
# gradient in the forward, and the backward never reads them; alone and with all of the above
XENT_FUSED = ("bf16-logits-lse-pallas-xent-fused", dict(f32_logits=False, logsumexp="pallas", xent="fused"))
ALL_KERNELS = ("bf16-logits-qkv-separate-gelu-epilogue-ln-pallas-lse-pallas-xent-fused",
               dict(f32_logits=False, qkv="separate", gelu="epilogue", layer_norm="pallas", logsumexp="pallas",
                    xent="fused"))
# and the MLP's GELU backward inside the proj matmul's backward (GPTConfig.gelu_grad "pallas",
# zoo.ops.matmul_gelu: one Triton kernel, the matmul with GELU'(z) in its epilogue)
ALL_KERNELS_DGELU = (ALL_KERNELS[0] + "-gelu-grad-pallas", dict(ALL_KERNELS[1], gelu_grad="pallas"))
# the fastest run with XLA's matmuls as cuBLAS(Lt) calls only, no Triton GEMMs
# (xla_gpu_enable_triton_gemm=false, this run's compile alone): on the 2026-11-27 lease the step
# compiled on the device had no cuBLASLt epilogue at all (207 matmuls, epilogue DEFAULT), so the
# bias adds and GELU_AUX ran as fusions of their own (the fc's bias and GELU: 4.1 ms per step),
# where the same step compiled for an H200 without a device, Triton GEMMs off, takes the bias and
# the GELU into the matmuls (benchmarks/scripts/gpt_step_hlo.py): autotuning's Triton candidates
# keep the epilogues from forming. A third element of a run: its XLA compiler options
NO_TRITON_GEMM = {"xla_gpu_enable_triton_gemm": False}
SEPARATE_EPILOGUE_LN_LSE_CUBLAS = (SEPARATE_EPILOGUE_LN_LSE[0] + "-cublas", SEPARATE_EPILOGUE_LN_LSE[1],
                                   NO_TRITON_GEMM)
# the fastest run with the MLP's GELU backward in cuBLASLt's DGELU_BGRAD epilogue (GPTConfig.gelu_grad
# "cublaslt", zoo.ops.cublaslt: the product g @ w.T never written or read back, 0.8 of the 1.2 GB
# per layer that XLA's form moves), with XLA's Triton GEMMs on and off
DGELU_CUBLASLT = (SEPARATE_EPILOGUE_LN_LSE[0] + "-gelu-grad-cublaslt", dict(SEPARATE_EPILOGUE_LN_LSE[1],
                                                                             gelu_grad="cublaslt"))
DGELU_CUBLASLT_CUBLAS = (DGELU_CUBLASLT[0] + "-cublas", DGELU_CUBLASLT[1], NO_TRITON_GEMM)
# and the q/k/v projections' weight and bias gradients in one cuBLASLt matmul each (GPTConfig.qkv_grad
# "cublaslt", zoo.ops.linear.dense: the BGRADB epilogue sums dy as the matmul reads it, where XLA
# reads it in a pass of its own, 3.7 GB per step)
QKV_CUBLASLT_CUBLAS = (DGELU_CUBLASLT[0] + "-qkv-grad-cublaslt-cublas", dict(DGELU_CUBLASLT[1], qkv_grad="cublaslt"),
                       NO_TRITON_GEMM)
# and the output layer inside the loss too (GPTConfig.xent "fused"): every kernel of the zoo's
ALL_CUBLASLT_CUBLAS = (ALL_KERNELS[0] + "-gelu-grad-cublaslt-qkv-grad-cublaslt-cublas",
                       dict(ALL_KERNELS[1], gelu_grad="cublaslt", qkv_grad="cublaslt"), NO_TRITON_GEMM)
# GPTConfig's defaults since 2026-11-27 with bf16 logits: layer_norm and logsumexp "auto" (the
# Pallas kernels on an NVIDIA GPU)
BF16_LOGITS_AUTO = ("bf16-logits-auto", dict(f32_logits=False, layer_norm="auto", logsumexp="auto"))
# the PyTorch peer (zoo.bench.torch_gpt): eager, and torch.compile'd
TORCH = ("torch", {})
TORCH_COMPILED = ("torch-compiled", {})
PEERS = {"torch": "torch-nanogpt", "torch-compiled": "torch-nanogpt-compiled"}  # run variant -> row name
# (batch, (variant name, GPTConfig changes) or None) per run, in order; `more`: runs timed only
# when ZOO_GPT_STEP_RUNS names them (the default, f32 logits: 45.1% MFU, H200 2026-11-27, measured
# on four leases; the single variants and PyTorch eager, measured on the thirteenth session's lease)
# the runs' base pins the Pallas kernels off (GPTConfig's "auto" runs them on a GPU since
# 2026-11-27), so that each run's name says what it runs, as on the leases before
FULL = dict(cfg=GPTConfig(vocab_size=50304, max_len=1024, num_layers=12, hidden=768, num_heads=12,
                          dtype="bfloat16", layer_norm="xla", logsumexp="xla"),
            runs=((64, SEPARATE_EPILOGUE_LN_LSE), (64, ALL_CUBLASLT_CUBLAS), (64, QKV_CUBLASLT_CUBLAS),
                  (64, TORCH_COMPILED), (64, DGELU_CUBLASLT_CUBLAS), (64, SEPARATE_EPILOGUE_LN_LSE_CUBLAS),
                  (64, DGELU_CUBLASLT), (64, ALL_KERNELS), (64, BF16_LOGITS_AUTO), (64, BF16_LOGITS)),
            more=((64, SEPARATE_EPILOGUE), (64, ALL_KERNELS_DGELU), (64, XENT_FUSED), (64, SEPARATE_EPILOGUE_LN), (64, LSE_PALLAS), (64, GELU_EPILOGUE), (64, LN_PALLAS), (64, SEPARATE_SIGMOID), (64, QKV_SEPARATE), (64, GELU_SIGMOID), (64, QKV_SPLIT_GRAD),
                  (64, SPLIT_GRAD_SIGMOID), (64, TORCH), (64, None), (128, BF16_LOGITS), (128, SEPARATE_EPILOGUE_LN_LSE), (128, SEPARATE_EPILOGUE_LN),
                  (128, SEPARATE_EPILOGUE), (128, SEPARATE_SIGMOID)))
QUICK = dict(cfg=GPTConfig(vocab_size=256, max_len=256, num_layers=4, hidden=256, num_heads=8),
             runs=((8, None), (8, TORCH)))


def model_flops_per_token(cfg: GPTConfig, T: int) -> float:
    H, L = cfg.hidden, cfg.num_layers
    per_layer = 4 * H * H + 2 * H * int(H * cfg.mlp_ratio)  # q, k, v, out + MLP (kv = heads here)
    n = L * per_layer + cfg.vocab_size * H  # + the tied output layer
    return 6.0 * n + 12.0 * L * H * T


def _peak(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    return None


_CEILINGS: dict[int, float] = {}  # hidden width -> the same-run matmul ceiling (FLOP/s)


def _matmul_ceiling(H: int) -> float:
    n = max(1024, 4 * H)
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    return 2.0 * n**3 / median_seconds(lambda: f(a).block_until_ready(), iters=7)


def run_name(B, variant):
    """A run's name as ZOO_GPT_STEP_RUNS and the rows take it: "64", "64-bf16-logits"."""
    return f"{B}-{variant[0]}" if variant else str(B)


def selected_runs(runs, more=()):
    """The runs to time: all of `runs`, or those ZOO_GPT_STEP_RUNS names (e.g. "64,64-bf16-logits")
    among runs and `more`, in that order."""
    want = [w for w in os.environ.get("ZOO_GPT_STEP_RUNS", "").replace(" ", "").split(",") if w]
    if not want:
        return runs
    names = [run_name(*r) for r in runs + more]
    unknown = [w for w in want if w not in names]
    if unknown:
        raise ValueError(f"ZOO_GPT_STEP_RUNS: {unknown} not among this benchmark's runs {names}")
    return tuple(r for r in runs + more if run_name(*r) in want)


def run(quick: bool) -> list[dict]:
    spec = QUICK if quick else FULL
    rows, failed = [], []
    _CEILINGS.clear()
    for B, variant in selected_runs(spec["runs"], spec.get("more", ())):
        name, changes, *options = variant or ("", {})
        kw = {"compiler_options": options[0]} if options else {}
        make_rows = peer_rows if name in PEERS else step_rows
        try:
            rows += make_rows(dataclasses.replace(spec["cfg"], **changes), B, iters=10 if quick else 20,
                              variant=name, **kw)
        except Exception as e:  # noqa: BLE001 - a failing run loses its own rows only
            first = (str(e).splitlines() or [""])[0][:200]
            if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
                print(f"  skip B{B} {name}: out of memory ({first[:120]})", flush=True)
                continue
            # anything else (a kernel that does not compile on this device, a bug): its traceback
            # now, the runs after it still run (their rows emitted), and the first failure raised
            # at the end; without its traceback, whose frames would hold the run's device arrays
            print(f"  FAILED B{B} {name}: {type(e).__name__}: {first}", flush=True)
            traceback.print_exc()
            failed.append(e.with_traceback(None))
    if failed:
        raise failed[0]
    return rows


def step_rows(cfg: GPTConfig, B: int, *, iters: int = 10, variant: str = "",
              compiler_options: dict | None = None) -> list[dict]:
    """The train step's rows (and, without a known peak, the matmul ceiling's) at batch B; a
    variant's rows are named zoo-train-step-VARIANT(-pipelined). compiler_options: XLA's, for
    the step's compile."""
    import optax

    md = make_gpt(cfg)
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    batch = _batch(cfg, B)
    state = jax.jit(lambda k: init_state(md.init(k, batch), tx, 0.0))(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    # compiled once, ahead of time: its program is the one the profile reads (step.as_text()),
    # where jit's own executable would take a second compile to show (~20 s a run on a lease)
    step = jax.jit(make_train_step(md, tx, 0.0), donate_argnums=(0,),
                   compiler_options=compiler_options).lower(state, key, batch).compile()
    losses_first = []
    for _ in range(3):
        state, metrics = step(state, key, batch)
        losses_first.append(float(metrics["loss"]))
    print(f"  first losses at B{B}{' ' + variant if variant else ''}: {losses_first}", flush=True)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        state, metrics = step(state, key, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    # the same steps dispatched back to back with one wait at the end: the per-step wait above
    # leaves the device idle while Python dispatches the next step (a 590-leaf state for GPT-124M);
    # the training loop overlaps the two (it reads step s's metrics after dispatching step s + 1)
    jax.block_until_ready(state)
    t = time.perf_counter()
    for _ in range(iters):
        state, metrics = step(state, key, batch)
    jax.block_until_ready((state, metrics))
    sec_pipelined = (time.perf_counter() - t) / iters

    def one_step():
        nonlocal state
        state, m = step(state, key, batch)
        jax.block_until_ready(m)

    def three_steps():  # as the pipelined row runs them: does the device wait between steps?
        nonlocal state
        for _ in range(3):
            state, m = step(state, key, batch)
        jax.block_until_ready((state, m))

    suffix = f"-{variant}" if variant else ""
    # the rows out before the profiles (~20 s with ZOO_PROFILE): a time limit that cuts a profile
    # keeps the run's figures
    rows = emit(_rows(cfg, B, f"zoo-train-step{suffix}", sec, sec_pipelined, losses_first))
    profile.report(one_step, calls=3, title=f"the GPT train step{suffix} at B{B}", name=f"gpt_step{suffix}-B{B}",
                   hlo=step.as_text)
    profile.report(three_steps, calls=1, top=3, title=f"three pipelined GPT train steps{suffix} at B{B}")
    del state
    return rows


def peer_rows(cfg: GPTConfig, B: int, *, iters: int = 10, variant: str = "torch") -> list[dict]:
    """The PyTorch peer's rows (zoo.bench.torch_gpt; none, with a note, without torch): the same
    init, batch, optimizer and timing as step_rows."""
    try:
        import torch

        from zoo.bench import torch_gpt
    except ImportError:
        print(f"  skip B{B} {variant}: torch is not installed (the `peers` extra)", flush=True)
        return []
    if jax.devices()[0].platform != "cpu" and not torch.cuda.is_available():
        print(f"  skip B{B} {variant}: this torch has no CUDA (the zoo runs on "
              f"{jax.devices()[0].platform}; a CPU peer would compare nothing)", flush=True)
        return []
    batch = _batch(cfg, B)
    params = jax.device_get(jax.jit(make_gpt(cfg).init)(jax.random.PRNGKey(0), batch))
    try:
        step, dev = torch_gpt.make_step(cfg, params, compiled=variant == "torch-compiled", lr=LR,
                                        weight_decay=WEIGHT_DECAY)
        x = torch.as_tensor(np.array(batch["x"]), dtype=torch.long, device=dev)
        first, sec, sec_pipelined = torch_gpt.time_steps(step, x, dev, iters)
        print(f"  first losses at B{B} {variant}: {first}", flush=True)
        del step, x
    finally:
        torch_gpt.free()
    return emit(_rows(cfg, B, PEERS[variant], sec, sec_pipelined, first))



def _batch(cfg: GPTConfig, B: int) -> dict:
    """Random tokens [B, T + 1] (the same in every run: the first losses compare across runs)."""
    x = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, cfg.max_len + 1)), jnp.int32)
    return {"x": x, "idx": jnp.arange(B, dtype=jnp.int32)}


def _rows(cfg: GPTConfig, B: int, impl: str, sec: float, sec_pipelined: float, losses_first) -> list[dict]:
    """impl's synced and pipelined rows (tokens/s, MFU), and, without a known peak, the matmul
    ceiling the MFU is counted against."""
    T = cfg.max_len
    per_token = model_flops_per_token(cfg, T)
    peak = _peak(jax.devices()[0])
    case = f"gpt-L{cfg.num_layers}-H{cfg.hidden}-T{T}-B{B}-{cfg.dtype}"
    # the first steps' losses: same init and batch in every run, so a variant that changes the
    # numerics (another XLA flag, say) shows it here
    rows = [{"case": case, "impl": impl, "value": B * T / sec, "unit": "tokens/s",
             "model_tflops": per_token * B * T / sec / 1e12, "step_s": sec, "first_losses": losses_first},
            {"case": case, "impl": f"{impl}-pipelined", "value": B * T / sec_pipelined, "unit": "tokens/s",
             "model_tflops": per_token * B * T / sec_pipelined / 1e12, "step_s": sec_pipelined}]
    if peak is None:  # measured once per width in a run, its row beside the first run's
        if cfg.hidden not in _CEILINGS:
            _CEILINGS[cfg.hidden] = _matmul_ceiling(cfg.hidden)
            rows.append({"case": case, "impl": "matmul-ceiling", "value": _CEILINGS[cfg.hidden] / 1e9,
                         "unit": "GFLOP/s"})
        peak = _CEILINGS[cfg.hidden]
        mfu_of = "same-run float32 matmul"
    else:
        mfu_of = f"{peak / 1e12:.0f} TFLOP/s bf16 spec peak"
    for row in rows[:2]:
        row["mfu"], row["mfu_of"] = row["model_tflops"] * 1e12 / peak, mfu_of
    return rows
