"""zoo.ops.cublaslt on a lent GPU before anything else uses it: the build (timed), the load, then
each call against float64 from the same bf16 inputs (GPT-124M's widths, 4,096 rows) and timed at
GPT-124M's B64 shape (65,536 rows; medians of 20 calls, each form's in one jitted loop):

- the MLP's GELU backward by cuBLASLt's DGELU_BGRAD epilogue, with w transposed first (the
  default) and as it is, beside XLA's form (zoo.ops.matmul_gelu);
- a q/k/v projection's weight and bias gradients by its BGRADB epilogue (the default) and by
  BGRADA, beside XLA's (zoo.ops.linear.dense).

Of each call's two forms the faster that checks out is the one the rest of the lease uses (see
`pick`).

Exit 0 when both are available and agree; 1 when the first is not (benchmarks/device.sh then
turns the calls off for the rest of the lease with ZOO_CUBLASLT=0, so the gpt_step runs that use
them lose their own rows only); 3 when the second is not (ZOO_CUBLASLT_WGRAD=0). A crash exits
non-zero too.
Run (GPU): python benchmarks/scripts/cublaslt_check.py"""
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from direct_call import ready
from zoo.ops import cublaslt
from zoo.ops.linear import dense
from zoo.ops.matmul_gelu import gelu_tanh_grad, matmul_gelu_grad

# rows checked against float64, and timed (GPT-124M at B64); the widths GPT-124M's MLP's
CHECK_ROWS, TIME_ROWS, K, N = 4096, 65536, 768, 3072


def _inputs(M, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (M, K), jnp.bfloat16),
            (0.3 * jax.random.normal(keys[1], (N, K))).astype(jnp.bfloat16),
            (2.0 * jax.random.normal(keys[2], (M, N))).astype(jnp.bfloat16))


def _time(impl, args, calls=20, rounds=7, op=None):
    """Median seconds per call of op(impl, *args) (a tuple of arrays), `calls` of them in one
    jitted loop (default op: matmul_gelu_grad)."""
    op = op or (lambda impl, g, w, z: matmul_gelu_grad(g, w, z, implementation=impl))
    f = jax.jit(lambda *a: jax.lax.fori_loop(0, calls, lambda i, acc: acc + op(impl, *a)[1][0], jnp.float32(0)))
    f(*args).block_until_ready()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        f(*args).block_until_ready()
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times)


def _failed(what: str, e: Exception) -> None:
    print(f"cublaslt: {what} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)


def _excess(got, ref, roundings: float) -> np.ndarray:
    """How far each of `got` lies beyond `roundings` bf16 roundings of float64 `ref` (10% slack)."""
    return np.abs(got - ref) - 1.1 * roundings * 2.0**-8 * np.abs(ref)


def check_dgelu(w_layout: str) -> bool:
    """dz and the column sums by cuBLASLt's DGELU_BGRAD, w handed over as `w_layout`
    (zoo.ops.cublaslt.DGELU_W_LAYOUTS), against float64; True if they agree. XLA's form from the
    same inputs is measured beside it.

    dz is held to two bf16 roundings (+1e-3 where it is near 0): the product g w^T rounded once,
    as XLA's form rounds it (a bf16 matmul) before the GELU' multiply, then dz. One rounding, the
    bound until the 2026-11-28 lease, is tighter than XLA's own arithmetic: there cuBLASLt's dz
    exceeded it by 0.102, what XLA's form exceeds it by at these sizes on a CPU. A result 1% off
    fails (tests/bench/test_cublaslt_check_script.py)."""
    os.environ["ZOO_CUBLASLT_DGELU_W"] = w_layout
    M = CHECK_ROWS
    g, w, z = _inputs(M)
    try:
        dz, db = jax.jit(lambda g, w, z: matmul_gelu_grad(g, w, z, implementation="cublaslt"))(g, w, z)
    except Exception as e:  # noqa: BLE001 - cuBLASLt refused this mapping
        _failed(f"dgelu w {w_layout}", e)
        return False
    xla_dz, _ = jax.jit(lambda g, w, z: matmul_gelu_grad(g, w, z, implementation="xla"))(g, w, z)
    product = np.asarray(g, np.float64) @ np.asarray(w, np.float64).T
    gelu_grad = np.asarray(gelu_tanh_grad(jnp.asarray(z, jnp.float32)), np.float64)
    ref = product * gelu_grad
    dz, db, xla_dz = (np.asarray(a, np.float64) for a in (dz, db, xla_dz))
    excess, xla_excess = _excess(dz, ref, 2), _excess(xla_dz, ref, 2)
    # the column sums within a bf16 rounding and 3x the rounding noise of M sums of rounded values
    noise = np.sqrt(M) * np.sqrt(np.mean(ref**2)) * 2.0**-8
    sums = float(np.max(np.abs(db - ref.sum(0)) / (noise + 2.0**-8 * np.abs(ref.sum(0)))))
    ok = excess.max() <= 1e-3 and sums <= 3.0
    print(f"cublaslt: dgelu w {w_layout} M{M} K{K} N{N} bf16: dz off float64 by at most two bf16 roundings + "
          f"{max(excess.max(), 0):.3g} (allowed 1e-3; XLA's form {max(xla_excess.max(), 0):.3g}), column sums up "
          f"to {sums:.3g}x their rounding noise {'ok' if ok else 'MISMATCH'}", flush=True)
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    print(f"cublaslt:   its worst element {tuple(map(int, worst))}: g w^T {product[worst]:.4g}, z "
          f"{float(np.asarray(z, np.float64)[worst]):.4g}, GELU'(z) {gelu_grad[worst]:.4g}, float64 dz "
          f"{ref[worst]:.4g}, cuBLASLt {dz[worst]:.4g}, XLA's form {xla_dz[worst]:.4g}; beyond one rounding: "
          f"{max(_excess(dz, ref, 1).max(), 0):.3g} (XLA's form {max(_excess(xla_dz, ref, 1).max(), 0):.3g})",
          flush=True)
    return bool(ok)


def time_dgelu(layouts) -> dict:
    """XLA's form and cuBLASLt's call with w as each of `layouts`, at GPT-124M's B64: {form: median
    ms}, printed (the Pallas kernel, 1.12 ms on an H200 on 2026-11-27, is left to
    pallas_kernels.py: its Triton compile would cost the lease ~10 s)."""
    args = _inputs(TIME_ROWS)
    forms = [("xla", None), *(("cublaslt", w) for w in layouts)]
    ms = {}
    for impl, w_layout in forms:
        name = f"cublaslt w {w_layout}" if w_layout else impl
        if w_layout:
            os.environ["ZOO_CUBLASLT_DGELU_W"] = w_layout
        try:
            ms[w_layout or impl] = _time(impl, args) * 1e3
        except Exception as e:  # noqa: BLE001 - a form that fails here loses its own row
            _failed(name, e)
    flop = 2 * TIME_ROWS * N * K
    print(f"cublaslt: dgelu M{TIME_ROWS} K{K} N{N} bf16 (GPT-124M B64, per layer): " + ", ".join(
        f"{'cublaslt w ' if k in cublaslt.DGELU_W_LAYOUTS else ''}{k} {v:.3f} ms ({flop / v / 1e9:.0f} TFLOP/s)"
        for k, v in ms.items()), flush=True)
    return ms


def _wgrad(impl, x, w, b, dy):
    """dense's (w, b) gradients by `impl` (x's unused: only the weight gradient's matmul runs)."""
    return jax.vjp(lambda w, b: dense(x, w, b, weight_grad=impl), w, b)[1](dy)


def check_wgrad(epilogue: str) -> bool:
    """The weight and bias gradients by cuBLASLt's `epilogue` (zoo.ops.cublaslt.WGRAD_EPILOGUES)
    against float64; True if they agree."""
    os.environ["ZOO_CUBLASLT_WGRAD_EPILOGUE"] = epilogue
    M = CHECK_ROWS
    keys = jax.random.split(jax.random.key(1), 2)
    x, dy = (jax.random.normal(k, (M, K), jnp.bfloat16) for k in keys)
    w, b = jnp.zeros((K, K), jnp.float32), jnp.zeros(K, jnp.float32)
    try:
        dw, db = jax.jit(lambda *a: _wgrad("cublaslt", *a))(x, w, b, dy)
    except Exception as e:  # noqa: BLE001 - cuBLASLt refused this epilogue
        _failed(f"wgrad {epilogue}", e)
        return False
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    ref_w, ref_b = x64.T @ dy64, dy64.sum(0)
    # each within one bf16 rounding of float64 (the float32 accumulator's sums, rounded once)
    # and 1e-3 absolute where it is near 0
    excess = max(float(_excess(np.asarray(got, np.float64), ref, 1).max()) for got, ref in ((dw, ref_w), (db, ref_b)))
    ok = excess <= 1e-3
    print(f"cublaslt: wgrad {epilogue} M{M} I{K} F{K} bf16: dw and db off float64 by at most one bf16 rounding + "
          f"{max(excess, 0):.3g} (allowed 1e-3) {'ok' if ok else 'MISMATCH'}", flush=True)
    return ok


def time_wgrad(epilogues) -> dict:
    """XLA's weight and bias gradients and cuBLASLt's by each of `epilogues`, at GPT-124M's B64:
    {form: median ms}, printed."""
    keys = jax.random.split(jax.random.key(2), 2)
    x, dy = (jax.random.normal(k, (TIME_ROWS, K), jnp.bfloat16) for k in keys)
    args = (x, jnp.zeros((K, K), jnp.float32), jnp.zeros(K, jnp.float32), dy)
    ms = {"xla": _time("xla", args, op=_wgrad) * 1e3}
    for epilogue in epilogues:
        os.environ["ZOO_CUBLASLT_WGRAD_EPILOGUE"] = epilogue
        try:
            ms[epilogue] = _time("cublaslt", args, op=_wgrad) * 1e3
        except Exception as e:  # noqa: BLE001 - a form that fails here loses its own row
            _failed(f"cublaslt {epilogue}", e)
    print(f"cublaslt: wgrad M{TIME_ROWS} I{K} F{K} bf16 (GPT-124M B64, per projection): " + ", ".join(
        f"{'' if k == 'xla' else 'cublaslt '}{k} {v:.3f} ms ({2 * TIME_ROWS * K * K / v / 1e9:.0f} TFLOP/s)"
        for k, v in ms.items()), flush=True)
    return ms


def pick(label: str, env: str, default: str, options, check, time_them) -> bool:
    """Each of `options` checked (the default first), those that check out timed; the fastest is
    the one the rest of the lease uses: `export ENV=...` appended to the file ZOO_CHECK_ENV_FILE
    names (benchmarks/device.sh sources it). True if one is usable: that one, or without such a
    file the default. `env` is left at the default in this process."""
    good = [o for o in (default, *(o for o in options if o != default)) if check(o)]
    ms = time_them(good) if good else {}
    os.environ[env] = default
    timed = [o for o in good if o in ms]
    env_file = os.environ.get("ZOO_CHECK_ENV_FILE")
    if env_file and timed:
        best = min(timed, key=ms.get)
        with open(env_file, "a") as f:
            f.write(f"export {env}={best}\n")
        print(f"cublaslt: {label} by {best} for the rest of the lease", flush=True)
        return True
    return default in good


def main() -> int:
    if not ready(cublaslt, "cublaslt", "cuBLASLt"):
        return 1
    if not pick("dgelu w", "ZOO_CUBLASLT_DGELU_W", cublaslt.dgelu_w_layout(), cublaslt.DGELU_W_LAYOUTS,
                check_dgelu, time_dgelu):
        return 1
    if not pick("wgrad", "ZOO_CUBLASLT_WGRAD_EPILOGUE", cublaslt.wgrad_epilogue(), cublaslt.WGRAD_EPILOGUES,
                check_wgrad, time_wgrad):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
