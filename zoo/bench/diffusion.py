"""Diffusion throughput: the zoo UNet (`zoo.nn.unet`) as a denoiser, in img-NFE/s (images x
network evaluations per second: batch / seconds per forward call), and whole DDIM sampling runs
(`zoo.ops.diffusion.ddim_sample`, one jitted lax.scan), in images/s, beside Hugging Face
diffusers' `UNet2DModel` and `DDIMScheduler` loop in the same process when diffusers is installed.

Both sides compute the same function: the diffusers model is built from `diffusers_kwargs(cfg)`,
its weights are ported with `from_diffusers`, parameter counts are asserted equal and the two
float32 outputs are checked to agree before anything is timed. Without diffusers the zoo params
are drawn in NumPy (`random_params`) and the peer rows are absent.

Implementations. Denoiser: `zoo-f32`, `zoo-bf16` (params and activations in bfloat16, as
diffusers' `.to(torch.bfloat16)`; GroupNorm statistics in float32), `diffusers-eager-f32|bf16`
under torch.inference_mode, `diffusers-compile-bf16` (torch.compile, CUDA only). A timed call is
`calls` forwards back to back, each reading the previous output, so host dispatch overlaps the
device work. DDIM (eta 0, no clipping, the trailing spacing on both sides: linear betas 1e-4..0.02,
T = 1000, final alpha 1): `zoo-ddim50-scan`, one jitted scan of 50 evaluations, against
`diffusers-ddim50-loop`, the standard `for t in scheduler.timesteps` loop over the eager model;
the sampler state is float32 on both sides, the network runs in the case's dtype.
Implementations are timed in interleaved rounds (every one once per round, after a short pause
on CPU so that OpenMP threads still spinning from the previous call go idle; from the second round
on, calls under 0.25 s follow an untimed call so they do not pay for waking the thread pools) and
the value is the median over rounds. On CPU torch gets as many threads as XLA's pool has cores (reported per row)
and OMP_WAIT_POLICY=PASSIVE unless the caller sets it (see `run`).

Quick (CPU): `unet-small32` (32x32x3, channels 32/64/64, two ResNets per level, attention at
16x16; 1.6M parameters) at batch 8, f32 and bf16 denoiser, f32 DDIM-50.
Full (accelerator): Ho et al.'s CIFAR-10 UNet (`DDPM_CIFAR10`, 35.7M parameters, dropout off in
evaluation) at batch 256, f32 and bf16 denoiser with the torch.compile peer, bf16 DDIM-50.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from zoo import xla
from zoo.bench import emit, interleaved_times, profile
from zoo.nn.unet import DDPM_CIFAR10, UNet, UNetConfig, diffusers_kwargs, from_diffusers, param_shapes
from zoo.ops.diffusion import ddim_sample, linear_schedule
from zoo.ops.lora import count_params

SMALL32 = UNetConfig(in_channels=3, block_out_channels=(32, 64, 64), layers_per_block=2,
                     attention_levels=(False, True, False), norm_num_groups=8)
DTYPES = {"f32": "float32", "bf16": "bfloat16"}
PAUSE_S = 0.2  # CPU only: lets OpenMP / XLA worker threads stop spinning before the next call


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str  # config name in the case strings
    cfg: UNetConfig
    batch: int
    size: int = 32  # image height = width
    dtypes: tuple[str, ...] = ("f32", "bf16")  # denoiser dtypes (keys of DTYPES)
    ddim_dtype: str | None = "f32"  # network dtype inside the DDIM runs; None = no DDIM rows
    ddim_steps: int = 50
    calls: int = 1  # forwards per timed denoiser call
    warmup: int = 1  # untimed denoiser calls first (the first compiles)
    rounds: int = 5  # interleaved rounds, denoiser
    ddim_rounds: int = 3  # interleaved rounds, DDIM


QUICK = Spec("unet-small32", SMALL32, batch=8)
FULL = Spec("unet-cifar10", DDPM_CIFAR10, batch=256, ddim_dtype="bf16", calls=10, warmup=3, rounds=7,
            ddim_rounds=5)


def load_peer():
    """(torch, diffusers) when both are installed, else None."""
    try:
        import diffusers
        import torch
    except ImportError:
        return None
    return torch, diffusers


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def random_params(cfg: UNetConfig, seed: int = 0) -> dict:
    """UNet(cfg) params drawn in NumPy: kernels N(0, 1 / fan_in), embeddings N(0, 1), GroupNorm
    scales 1, biases 0. Timing needs only realistic magnitudes, and a jitted UNet.init costs
    seconds to tens of seconds of compile on a CPU."""
    r = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return jnp.asarray(r.standard_normal(leaf.shape, np.float32) / np.sqrt(np.prod(leaf.shape[:-1])))
        if name == "embedding":
            return jnp.asarray(r.standard_normal(leaf.shape, np.float32))
        return jnp.full(leaf.shape, 1.0 if name == "scale" else 0.0, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


def make_models(cfg: UNetConfig, seed: int = 0):
    """(zoo float32 params, diffusers UNet2DModel in eval mode or None): the zoo params are the
    diffusers weights ported with `from_diffusers` when diffusers is installed, else
    `random_params`."""
    peer = load_peer()
    if peer is None:
        return random_params(cfg, seed), None
    torch, diffusers = peer
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**diffusers_kwargs(dataclasses.replace(cfg, dtype=None))).eval()
    params = jax.tree.map(jnp.asarray, from_diffusers(model.state_dict(), cfg))
    ours, theirs = count_params(params), sum(p.numel() for p in model.parameters())
    if ours != theirs:
        raise AssertionError(f"parameter counts differ: zoo {ours:,} vs diffusers {theirs:,}")
    return params, model


@functools.lru_cache(maxsize=None)
def _forward(cfg: UNetConfig):
    """The jitted denoiser of one config (cached, so the agreement check and the timed float32
    calls share one compile)."""
    return xla.jit(lambda p, x, t: UNet(cfg).apply({"params": p}, x, t))


def check_agreement(cfg: UNetConfig, params, model, x_BxHxWxC, t_B, *, rtol: float = 1e-3) -> float:
    """Max |zoo - diffusers| of the float32 outputs (full-precision matmuls and convs on both
    sides: no TF32 on a GPU); raises if it exceeds rtol * max |diffusers output|."""
    torch = load_peer()[0]
    dev = next(model.parameters()).device
    if _on_cpu():
        ours = _forward(cfg)(params, x_BxHxWxC, t_B)
    else:
        with jax.default_matmul_precision("highest"):
            ours = xla.jit(lambda p, x, t: UNet(cfg).apply({"params": p}, x, t))(params, x_BxHxWxC, t_B)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(x_BxHxWxC).transpose(0, 3, 1, 2).copy(), device=dev)
            ref = model(x, torch.as_tensor(np.asarray(t_B), device=dev)).sample.float().cpu().numpy()
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    err = float(np.abs(np.asarray(ours).transpose(0, 3, 1, 2) - ref).max())
    if err > rtol * max(1.0, float(np.abs(ref).max())):
        raise AssertionError(f"zoo and diffusers outputs differ by {err:.3g} (ported weights)")
    return err


# ---- one timed call per implementation ----

def _in_dtype(cfg, params, dtype):
    """cfg computing in dtype and params stored in it (as torch's module.to(dtype))."""
    if dtype == "float32":
        return cfg, params
    return dataclasses.replace(cfg, dtype=jnp.dtype(dtype)), jax.tree.map(lambda a: a.astype(dtype), params)


def _zoo_denoiser(cfg, params, dtype, x, t, calls):
    cfg, params = _in_dtype(cfg, params, dtype)
    f = _forward(cfg)
    x, t = jnp.asarray(x), jnp.asarray(t)

    def run():
        y = x
        for _ in range(calls):
            y = f(params, y, t)
        return y.block_until_ready()

    run.hlo = lambda: f.lower(params, x, t).compile().as_text()
    return run


def _torch_sync(torch, dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _cast(model, tdtype):
    """A copy of the model in tdtype (the model itself for float32), without diffusers' warning
    that casting skips modules to keep in float32 (UNet2DModel lists none)."""
    torch, diffusers = load_peer()
    if tdtype == torch.float32:
        return model
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        return copy.deepcopy(model).to(tdtype)
    finally:
        diffusers.utils.logging.set_verbosity(level)


def _torch_denoiser(model, dtype, x, t, calls, *, compiled=False):
    torch = load_peer()[0]
    dev = next(model.parameters()).device
    tdtype = getattr(torch, dtype)
    net = _cast(model, tdtype)
    if compiled:
        net = torch.compile(net)
    x = torch.as_tensor(np.asarray(x).transpose(0, 3, 1, 2).copy(), device=dev).to(tdtype)
    t = torch.as_tensor(np.asarray(t), device=dev)

    def run():
        with torch.inference_mode():
            y = x
            for _ in range(calls):
                y = net(y, t).sample
            _torch_sync(torch, dev)
        return y

    return run


@functools.lru_cache(maxsize=None)
def _ddim(cfg: UNetConfig, steps: int):
    """The jitted DDIM sampler (eta 0, from a given x_T) of one config and step count."""
    schedule = linear_schedule(1000)

    def sample(p, x_T):
        eps_fn = lambda x, t: UNet(cfg).apply({"params": p}, x, t)
        return ddim_sample(None, eps_fn, schedule, x_T.shape, steps, x_T=x_T)

    return xla.jit(sample)


def _zoo_ddim(cfg, params, dtype, x_T, steps):
    cfg, params = _in_dtype(cfg, params, dtype)
    x_T = jnp.asarray(x_T)
    f = _ddim(cfg, steps).lower(params, x_T).compile()  # ahead of time: a run is long, skip its warm-up
    return lambda: f(params, x_T).block_until_ready()


def diffusers_ddim_scheduler(steps: int):
    """DDIMScheduler on the zoo's schedule and timesteps: linear betas, T = 1000, final alpha 1,
    trailing spacing, no clipping."""
    diffusers = load_peer()[1]
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                    beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                                    timestep_spacing="trailing")
    sched.set_timesteps(steps)
    return sched


def _torch_ddim(model, dtype, x_T, steps):
    torch = load_peer()[0]
    dev = next(model.parameters()).device
    tdtype = getattr(torch, dtype)
    net = _cast(model, tdtype)
    sched = diffusers_ddim_scheduler(steps)
    x_T = torch.as_tensor(np.asarray(x_T).transpose(0, 3, 1, 2).copy(), device=dev)

    def run():
        with torch.inference_mode():
            x = x_T
            for t in sched.timesteps:
                eps = net(x.to(tdtype), t).sample
                x = sched.step(eps.float(), t, x).prev_sample
            _torch_sync(torch, dev)
        return x

    return run


# ---- timing ----

def _interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """{impl: median seconds of one call}, every implementation once per round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    # warm_below_s: without it, single short calls after the pause paid for waking the thread
    # pools and a loop of back-to-back calls (DDIM) ran faster per call than its denoiser figure
    times = interleaved_times(fns, rounds, pause_s=PAUSE_S if _on_cpu() else 0.0, warm_below_s=0.25)
    return {impl: statistics.median(t) for impl, t in times.items()}


def _rows(case, medians, per_call, unit, extra):
    return emit([{"case": case, "impl": impl, "value": per_call / s, "unit": unit, "median_s": s, **extra}
                 for impl, s in medians.items()])


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """torch's intra-op threads set to n (None: XLA's CPU pool, one per core) and restored."""
    torch = load_peer()[0]
    before = torch.get_num_threads()
    torch.set_num_threads(n or len(os.sched_getaffinity(0)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _denoiser_rows(spec, params, model, x, t, extra):
    on_gpu, B, rows = jax.default_backend() == "gpu", spec.batch, []
    for short in spec.dtypes:
        dtype = DTYPES[short]
        fns = {f"zoo-{short}": _zoo_denoiser(spec.cfg, params, dtype, x, t, spec.calls)}
        if model is not None:
            fns[f"diffusers-eager-{short}"] = _torch_denoiser(model, dtype, x, t, spec.calls)
            if on_gpu and short == "bf16":
                fns[f"diffusers-compile-{short}"] = _torch_denoiser(model, dtype, x, t, spec.calls,
                                                                    compiled=True)
        medians = _interleaved(fns, spec.rounds, warmup=spec.warmup)
        rows += _rows(f"{spec.name} B{B} denoiser {short}", medians, B * spec.calls, "img-NFE/s", extra)
        zoo_fn = fns[f"zoo-{short}"]
        profile.report(zoo_fn, calls=1, title=f"{spec.calls} zoo denoiser calls, {short}",
                       name=f"unet-{spec.name}-B{B}-{short}", hlo=zoo_fn.hlo)
        print(f"  done denoiser {short}", flush=True)
    return rows


def _ddim_rows(spec, params, model, x, extra):
    dtype, n = DTYPES[spec.ddim_dtype], spec.ddim_steps
    fns = {f"zoo-ddim{n}-scan": _zoo_ddim(spec.cfg, params, dtype, x, n)}
    if model is not None:
        fns[f"diffusers-ddim{n}-loop"] = _torch_ddim(model, dtype, x, n)
    # no warm-up run on CPU (each is 50 network calls): the zoo's sampler is compiled ahead of
    # time and the eager model has run at these shapes in the denoiser case
    medians = _interleaved(fns, spec.ddim_rounds, warmup=0 if _on_cpu() else 1)
    print(f"  done ddim{n}", flush=True)
    return _rows(f"{spec.name} B{spec.batch} ddim{n} {spec.ddim_dtype}", medians, spec.batch, "images/s", extra)


def bench_spec(spec: Spec, *, seed: int = 0, torch_threads: int | None = None, models=None) -> list[dict]:
    """All rows of one Spec: a denoiser case per dtype, then the DDIM case. On CPU torch runs on
    `torch_threads` (None: as many as XLA's pool, one per core); `models`: make_models(spec.cfg)'s
    result, when the caller has it."""
    params, model = models or make_models(spec.cfg, seed)
    r = np.random.default_rng(seed)
    x = r.standard_normal((spec.batch, spec.size, spec.size, spec.cfg.in_channels)).astype(np.float32)
    t = r.integers(0, 1000, spec.batch).astype(np.int32)
    if model is None:
        threads = contextlib.nullcontext(None)
    elif jax.default_backend() == "gpu":
        model, threads = model.to("cuda"), contextlib.nullcontext(None)
    else:
        threads = _torch_threads(torch_threads)
    with threads as n:
        extra = {} if n is None else {"threads": n, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}
        if model is not None:
            # on an accelerator, a difference past rtol is recorded in every row and printed
            # rather than raised, so a long device run still returns its timings
            try:
                extra["max_abs_diff_f32"] = check_agreement(spec.cfg, params, model, x, t)
            except AssertionError as e:
                if _on_cpu():
                    raise
                print(f"  WARNING: {e}", flush=True)
                extra["agreement_failed"] = str(e)
        rows = _denoiser_rows(spec, params, model, x, t, extra)
        if spec.ddim_dtype is not None:
            rows += _ddim_rows(spec, params, model, x, extra)
    return rows


def run(quick: bool) -> list[dict]:
    # torch's OpenMP threads spin-wait at every op's barrier by default: on a CPU shared with other
    # jobs a spinning thread waits on a descheduled one and diffusers runs ~10x slower (2.8 vs
    # 32 img/s at the quick config). Passive waiting is the peer's better setting there; it takes
    # effect only if torch is not imported yet, and OMP_WAIT_POLICY set by the caller wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return bench_spec(QUICK if quick else FULL)
