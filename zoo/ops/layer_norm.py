"""Layer norm with the residual add before it, as one pass: `add_layer_norm(r, d, scale, bias)`
returns (h, y) with h = r + d (the residual stream) and y = LayerNorm(h) * scale + bias.

A pre-LayerNorm transformer (GPT-2) adds each branch's output to the residual stream and
normalises the sum for the next branch. XLA compiles that, for GPT-124M's step on an H200, to a
residual copy (the matmul that makes d adds r in place as its C input, and the layer norm's
backward still needs r), a reduction pass for the statistics and a second pass normalising; the
backward again to two passes (the row statistics, then dx with the residual gradient added).
Per layer norm ~0.6 GB forward and backward each at B64 (the step compiled for an H200:
benchmarks/scripts/gpt_step_hlo.py). `implementation="pallas"` runs each direction as one Triton
kernel (Pallas) that reads its inputs once: forward r and d in, h and y out (plus each row's mean
and 1/std, float32); backward h, y's gradient and h's own gradient in, the gradient of r and d
out, with the scale and bias gradients' partial column sums (float32) per block of rows. Two
options move more of a transformer block's backward into that kernel: `copies` (y's gradient as
several arrays, summed as the kernel reads them) and `d_bias` (the bias of the layer that made d
added here, its gradient dx's column sums); see add_layer_norm.

implementation:
- "xla": the plain formula (jax.numpy; autodiff), float32 statistics, as flax.linen.LayerNorm
  computes them;
- "pallas": the two kernels above, on an NVIDIA (CUDA) GPU; elsewhere the same kernels in
  Pallas's interpreter (correct, slow: for tests);
- "auto": "pallas" where JAX's default backend is an NVIDIA GPU, "xla" elsewhere (measured on an
  H200, 2026-11-27: the forward 1.23x and the backward 1.87x XLA's form alone; GPTConfig.
  layer_norm's default);
- None: "xla".

Under jit over several devices (a mesh, rows sharded: data parallel) each device runs the
kernels on its own rows, the scale and bias gradients summed across devices (zoo.ops._pallas.
by_rows); XLA would otherwise gather the inputs onto every device, as it does for any custom call.

Shapes: r and d [..., H] (d may be None: no add, h = r), scale, bias and d_bias [H]; h in r's
dtype (the sum rounded once), y in `dtype` (default r's), statistics in float32.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp

from zoo.ops._pallas import by_rows, columns, resolve, run

IMPLEMENTATIONS = ("xla", "pallas", "auto")
# the kernels' tiling (untuned: benchmarks/scripts/pallas_kernels.py sweeps it on a GPU)
_ROWS_FWD, _WARPS_FWD = 4, 4   # rows per forward program, its warps
_ROWS = 4        # rows per step of a backward program ...
_STEPS = 16      # ... and steps per program: the partial column sums are [M / 64, H]
_WARPS_BWD = 4


def resolved(implementation: str | None) -> str:
    """The implementation add_layer_norm runs for this name here: "xla" or "pallas" ("auto":
    "pallas" on an NVIDIA GPU, else "xla"; None: "xla"); an unknown name is a ValueError."""
    return resolve(implementation, IMPLEMENTATIONS, "add_layer_norm")


def add_layer_norm(r, d, scale, bias, *, eps: float = 1e-5, dtype=None, implementation: str | None = None,
                   copies: int = 1, d_bias=None):
    """(r + d, LayerNorm(r + d) * scale + bias): see the module's note. d None: (r, LayerNorm(r) ...).

    d_bias [H] (with d): h = r + d + d_bias, the sum in float32 rounded once to r's dtype; for the
    bias of the layer that made d, added here rather than by that layer, so that its gradient (the
    column sums of h's gradient) comes out of the backward kernel ("pallas") instead of a pass
    over d's gradient of its own.

    copies > 1: (h, (y, ..., y)), y handed out `copies` times, one per consumer (the separate q, k
    and v projections of an attention layer, say). Their gradients then reach the backward
    kernel ("pallas") as that many arrays, which it sums as it reads them, instead of autodiff
    summing them in a pass of their own before the kernel; "xla" hands out y itself each time."""
    impl = resolved(implementation)
    H = r.shape[-1]
    if d is not None and d.shape != r.shape:
        raise ValueError(f"add_layer_norm: r and d need one shape, got {r.shape} and {d.shape}")
    if scale.shape != (H,) or bias.shape != (H,):
        raise ValueError(f"add_layer_norm: scale and bias must be [{H}], got {scale.shape} and {bias.shape}")
    if not isinstance(copies, int) or copies < 1:
        raise ValueError(f"add_layer_norm: copies must be an int >= 1, got {copies!r}")
    if d_bias is not None and (d is None or d_bias.shape != (H,)):
        raise ValueError(f"add_layer_norm: d_bias must be [{H}] and come with d, got "
                         f"{'no d' if d is None else d_bias.shape}")
    dtype = jnp.dtype(dtype or r.dtype)
    if impl == "xla":
        h, y = _reference(r, d, scale, bias, eps, dtype, d_bias)
        return h, (y if copies == 1 else (y,) * copies)
    flat = lambda a: None if a is None else a.reshape(-1, H)  # noqa: E731
    h, ys = _pallas(flat(r), flat(d if d is None else d.astype(r.dtype)), scale, bias, d_bias, eps, dtype, copies)
    ys = tuple(y.reshape(r.shape) for y in ys)
    return (r if h is None else h.reshape(r.shape)), (ys[0] if copies == 1 else ys)


def _reference(r, d, scale, bias, eps, dtype, d_bias=None):
    if d_bias is not None:
        acc = jnp.promote_types(r.dtype, jnp.float32)
        h = (r.astype(acc) + d.astype(acc) + d_bias.astype(acc)).astype(r.dtype)
    else:
        h = r if d is None else (r + d.astype(r.dtype))
    x = h.astype(jnp.promote_types(h.dtype, jnp.float32))
    mean = x.mean(-1, keepdims=True)
    xc = x - mean
    y = xc * jax.lax.rsqrt((xc * xc).mean(-1, keepdims=True) + eps) * scale + bias
    return h, y.astype(dtype)


# --- Pallas (Triton) kernels -------------------------------------------------------------------

def _fwd_kernel(*refs, H, M, eps, add, has_bias):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    if add:
        r_ref, d_ref, *refs = refs
        db_ref, refs = (refs[0], refs[1:]) if has_bias else (None, refs)
        g_ref, b_ref, h_ref, y_ref, mean_ref, rstd_ref = refs
    else:
        r_ref, g_ref, b_ref, y_ref, mean_ref, rstd_ref = refs
    cols, cmask = columns(H)
    rows = jnp.arange(_ROWS_FWD)
    rmask = pl.program_id(0) * _ROWS_FWD + rows < M
    mask = rmask[:, None] & cmask[None, :]
    at = (rows[:, None], cols[None, :])
    x = plgpu.load(r_ref.at[at], mask=mask, other=0.0)
    if add and has_bias:  # r + d + d_bias in float32, one rounding
        d = plgpu.load(d_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
        bias = plgpu.load(db_ref.at[cols], mask=cmask, other=0.0).astype(jnp.float32)
        x = (x.astype(jnp.float32) + d + bias[None, :]).astype(h_ref.dtype)
        plgpu.store(h_ref.at[at], x, mask=mask)
    elif add:
        x = x + plgpu.load(d_ref.at[at], mask=mask, other=0.0)  # in r's dtype, as h is kept
        plgpu.store(h_ref.at[at], x, mask=mask)
    x = x.astype(jnp.float32)
    mean = jnp.sum(x, axis=1) / H
    xc = jnp.where(mask, x - mean[:, None], 0.0)
    rstd = jax.lax.rsqrt(jnp.sum(xc * xc, axis=1) / H + eps)
    g = plgpu.load(g_ref.at[cols], mask=cmask, other=0.0).astype(jnp.float32)
    b = plgpu.load(b_ref.at[cols], mask=cmask, other=0.0).astype(jnp.float32)
    y = xc * rstd[:, None] * g[None, :] + b[None, :]
    plgpu.store(y_ref.at[at], y.astype(y_ref.dtype), mask=mask)
    plgpu.store(mean_ref.at[rows], mean, mask=rmask)
    plgpu.store(rstd_ref.at[rows], rstd, mask=rmask)


def _forward(r, d, scale, bias, eps, dtype, d_bias=None):
    """[M, H] -> (h or None, y, mean, rstd) by the forward kernel (per shard of rows on several
    devices)."""
    add, has_bias = d is not None, d_bias is not None
    args = [r, *([d] if add else []), *([d_bias] if has_bias else []), scale, bias]

    def local(r, *rest):
        d, rest = (rest[0], rest[1:]) if add else (None, rest)
        d_bias, rest = (rest[0], rest[1:]) if has_bias else (None, rest)
        return _forward_local(r, d, *rest, eps, dtype, d_bias)

    outs = by_rows(local, args, ["rows"] * (1 + add) + ["whole"] * (2 + has_bias), ["rows"] * (3 + add))
    return tuple(outs) if add else (None, *outs)


def _forward_local(r, d, scale, bias, eps, dtype, d_bias=None):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    M, H = r.shape
    row = pl.BlockSpec((_ROWS_FWD, H), lambda i: (i, 0))
    vec = pl.BlockSpec((H,), lambda i: (0,))
    stat = pl.BlockSpec((_ROWS_FWD,), lambda i: (i,))
    add = d is not None
    arr = lambda dt: jax.ShapeDtypeStruct((M, H), dt)  # noqa: E731
    stats = [jax.ShapeDtypeStruct((M,), jnp.float32)] * 2
    has_bias = d_bias is not None
    call = lambda interpret: pl.pallas_call(  # noqa: E731
        functools.partial(_fwd_kernel, H=H, M=M, eps=eps, add=add, has_bias=has_bias),
        grid=(pl.cdiv(M, _ROWS_FWD),),
        in_specs=[row] * (1 + add) + [vec] * (2 + has_bias),
        out_specs=[row, row, stat, stat] if add else [row, stat, stat],
        out_shape=([arr(r.dtype)] if add else []) + [arr(dtype)] + stats,
        compiler_params=plgpu.CompilerParams(num_warps=_WARPS_FWD),
        interpret=interpret, name="add_layer_norm_fwd" if add else "layer_norm_fwd")
    return tuple(run(call, *([r, d] if add else [r]), *([d_bias] if has_bias else []), scale, bias))


def _bwd_kernel(*refs, H, M, n_dy, has_dh, has_bias):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    h_ref, dy_refs, refs = refs[0], refs[1:1 + n_dy], refs[1 + n_dy:]
    dh_ref, refs = (refs[0], refs[1:]) if has_dh else (None, refs)
    g_ref, mean_ref, rstd_ref, dx_ref, part_ref = refs
    cols, cmask = columns(H)
    g = plgpu.load(g_ref.at[cols], mask=cmask, other=0.0).astype(jnp.float32)
    first = pl.program_id(0) * (_ROWS * _STEPS)

    def step(k, acc):
        dg, db, ds = acc
        rows = k * _ROWS + jnp.arange(_ROWS)
        rmask = first + rows < M
        mask = rmask[:, None] & cmask[None, :]
        at = (rows[:, None], cols[None, :])
        x = plgpu.load(h_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
        dy = functools.reduce(operator.add, [plgpu.load(ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
                                             for ref in dy_refs])
        mean = plgpu.load(mean_ref.at[rows], mask=rmask, other=0.0)
        rstd = plgpu.load(rstd_ref.at[rows], mask=rmask, other=0.0)
        xhat = jnp.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * g[None, :]
        c1 = jnp.sum(xhat * wdy, axis=1) / H
        c2 = jnp.sum(wdy, axis=1) / H
        dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if has_dh:
            dx = dx + plgpu.load(dh_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
        plgpu.store(dx_ref.at[at], dx.astype(dx_ref.dtype), mask=mask)
        # dx's column sums: the gradient of d_bias (the layer before's bias), when it came in here
        return (dg + jnp.sum(dy * xhat, axis=0), db + jnp.sum(dy, axis=0),
                ds + jnp.sum(jnp.where(mask, dx, 0.0), axis=0) if has_bias else ds)

    zero = jnp.zeros(cols.shape, jnp.float32)
    dg, db, ds = jax.lax.fori_loop(0, _STEPS, step, (zero, zero, zero))
    # this program's partial column sums, side by side in one row (one reduction over the rows
    # of programs sums all of them): scale's gradient, bias's, and d_bias's
    for k, part in enumerate([dg, db, ds][:2 + has_bias]):
        plgpu.store(part_ref.at[k * H + cols], part, mask=cmask)


def _backward(h, dys, dh, scale, mean, rstd, dx_dtype, has_bias=False):
    """(dx [M, H] (dh added when given), dscale, dbias (float32 sums)[, dx's column sums (float32),
    with has_bias]) by the backward kernel, for y's gradient the sum of the arrays `dys`; per shard
    of rows on several devices."""
    n, has_dh = len(dys), dh is not None

    def local(h, *rest):
        dys, (dh, scale, mean, rstd) = rest[:n], ((rest[n] if has_dh else None), *rest[n + has_dh:])
        return _backward_local(h, dys, dh, scale, mean, rstd, dx_dtype, has_bias)

    args = [h, *dys, *([dh] if has_dh else []), scale, mean, rstd]
    return by_rows(local, args, ["rows"] * (1 + n + has_dh) + ["whole", "rows", "rows"],
                   ["rows", "sum", "sum"] + ["sum"] * has_bias)


def _backward_local(h, dys, dh, scale, mean, rstd, dx_dtype, has_bias=False):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    M, H = h.shape
    rows = _ROWS * _STEPS
    G = pl.cdiv(M, rows)
    row = pl.BlockSpec((rows, H), lambda i: (i, 0))
    vec = pl.BlockSpec((H,), lambda i: (0,))
    stat = pl.BlockSpec((rows,), lambda i: (i,))
    K = 2 + has_bias
    part = pl.BlockSpec((K * H,), lambda i: (i,))  # program i's partial column sums: [G * K * H], row i
    has_dh = dh is not None
    call = lambda interpret: pl.pallas_call(  # noqa: E731
        functools.partial(_bwd_kernel, H=H, M=M, n_dy=len(dys), has_dh=has_dh, has_bias=has_bias),
        grid=(G,),
        in_specs=[row] * (1 + len(dys) + has_dh) + [vec, stat, stat],
        out_specs=[row, part],
        out_shape=[jax.ShapeDtypeStruct((M, H), dx_dtype), jax.ShapeDtypeStruct((G * K * H,), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=_WARPS_BWD),
        interpret=interpret, name="add_layer_norm_bwd" if has_dh else "layer_norm_bwd")
    dx, parts = run(call, h, *dys, *([dh] if has_dh else []), scale, mean, rstd)
    return (dx, *parts.reshape(G, K, H).sum(0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _pallas(r, d, scale, bias, d_bias, eps, dtype, copies):
    """[M, H] -> (h (None when d is), (y,) * copies)."""
    h, y, _, _ = _forward(r, d, scale, bias, eps, dtype, d_bias)
    return h, (y,) * copies


def _pallas_fwd(r, d, scale, bias, d_bias, eps, dtype, copies):
    h, y, mean, rstd = _forward(r, d, scale, bias, eps, dtype, d_bias)
    return (h, (y,) * copies), (r if h is None else h, scale, bias, d_bias, mean, rstd)


def _pallas_bwd(eps, dtype, copies, res, cts):
    x, scale, bias, d_bias, mean, rstd = res
    dh, dys = cts  # dh None when there was no add (no h)
    dx, dg, db, *ds = _backward(x, dys, dh, scale, mean, rstd, x.dtype, has_bias=d_bias is not None)
    return (dx, (None if dh is None else dx), dg.astype(scale.dtype), db.astype(bias.dtype),
            ds[0].astype(d_bias.dtype) if ds else None)


_pallas.defvjp(_pallas_fwd, _pallas_bwd)
