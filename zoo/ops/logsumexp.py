"""logsumexp over the last axis in one pass over x: `logsumexp(x, implementation=)`.

A language model's loss reads its [tokens, vocabulary] logits for the row's logsumexp. XLA runs
jax.nn.logsumexp as two passes: the row max, then the sum of exp(x - max). For GPT-124M's step at
B64 that is 2 x 6.6 GB of bf16 logits, 1.7 + 2.2 ms on an H200, where one read takes ~1.5 ms. A
one-pass lax.reduce carrying the running max and sum ran no faster (its per-element compare,
exponential and selects bound it, benchmarks/results/README.md). `implementation="pallas"` is one
Triton kernel (Pallas) that streams each row in tiles and keeps the online-softmax pair per row
(Milakov & Gimelshein 2018): m, the max so far, and s, the sum of exp(x - m), rescaled by
exp(m_old - m_new) once per tile, not per element.

implementation:
- "xla": jax.nn.logsumexp (float32 at least);
- "pallas": the kernel above on an NVIDIA (CUDA) GPU; elsewhere the same kernel in Pallas's
  interpreter (correct, slow: for tests);
- "auto": "pallas" where JAX's default backend is an NVIDIA GPU, "xla" elsewhere (measured on an
  H200, 2026-11-27: 1.93x jax.nn.logsumexp alone, and cross_entropy_and_grad's kernel 1.30x XLA's
  form; GPTConfig.logsumexp's default);
- None: "xla".

Under jit over several devices (rows sharded) each device runs the kernel on its own rows
(zoo.ops._pallas.by_rows).

x [..., V], any float dtype -> [...] in float32 (x's dtype if wider). The derivative is given in
closed form (d lse = sum(softmax(x) * dx)), so the kernel itself is never differentiated.
Special values as jax.nn.logsumexp: a row of -inf gives -inf, a +inf gives +inf, a NaN gives NaN.

`cross_entropy_and_grad(x, labels)` is the loss of a language model's output and its gradient in
one go: nll = logsumexp(x) - x[label] and d = softmax(x) - onehot(label), d nll / d x. Its kernel
reads each row once for (m, s, x[label]) and again to write d: from the L2 cache, if the row is
still there (few rows in flight: see XENT_TILE), or from the tile already loaded when one tile
holds the row (a small vocabulary). The logits are never read in the backward
(zoo.ops.losses.linear_cross_entropy keeps d in their place).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from zoo.ops._pallas import by_rows, columns, resolve, run

IMPLEMENTATIONS = ("xla", "pallas", "auto")
# the kernel's rows per program, columns per step, warps: the fastest of seven tilings on an H200
# (2026-11-27, benchmarks/scripts/pallas_kernels.py, [65536, 50304] bf16): 1.93x jax.nn.logsumexp,
# 3.3 TB/s; (4, 1024, 4), the default until then, 1.63x
TILE = (1, 2048, 4)
# cross_entropy_and_grad's kernel: rows per program, columns per step, warps: the fastest of seven
# on an H200 (same run): 1.30x XLA's form; (1, 8192, 32), the default until then, 1.04x. Small
# programs, many per SM, ran faster at every step down from 32 warps: more rows in flight, yet
# the second read of each row still hit the L2 (2.2 TB/s counting one read and one write)
XENT_TILE = (1, 1024, 4)


def logsumexp(x, *, implementation: str | None = None, tile: tuple[int, int, int] | None = None):
    """log(sum(exp(x), -1)) in float32 (at least): see the module's note. `tile` (pallas only):
    (rows per program, columns per step (a power of two), warps), default TILE."""
    impl = resolve(implementation, IMPLEMENTATIONS, "logsumexp")
    x = jnp.asarray(x)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"logsumexp: x must be [..., V] with V >= 1, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"logsumexp: x must be floating point, got {x.dtype}")
    if impl == "xla":
        return jax.nn.logsumexp(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=-1)
    rows, cols, warps = TILE if tile is None else tile
    if rows < 1 or cols < 1 or cols & (cols - 1) or warps < 1 or warps & (warps - 1):
        raise ValueError(f"logsumexp: tile must be (rows >= 1, columns a power of two, warps a power of two), "
                         f"got {tile!r}")
    return _lse_pallas(x.reshape(-1, x.shape[-1]), (rows, cols, warps)).reshape(x.shape[:-1])


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _lse_pallas(x, tile):
    return _forward(x, tile)


@_lse_pallas.defjvp
def _lse_jvp(tile, primals, tangents):
    (x,), (dx,) = primals, tangents
    lse = _forward(x, tile)
    p = jnp.exp(x.astype(lse.dtype) - lse[:, None])
    return lse, jnp.sum(p * dx.astype(lse.dtype), axis=-1)


def _kernel(x_ref, o_ref, *, M, V, rows, cols):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    r = jnp.arange(rows)
    rmask = pl.program_id(0) * rows + r < M
    dtype = o_ref.dtype

    def step(k, carry):
        c, cmask = columns(V, cols, k * cols)
        mask = rmask[:, None] & cmask[None, :]
        x = plgpu.load(x_ref.at[r[:, None], c[None, :]], mask=mask, other=-jnp.inf).astype(dtype)
        return _online(*carry, x)

    init = (jnp.full((rows,), -jnp.inf, dtype), jnp.zeros((rows,), dtype))
    m, s = jax.lax.fori_loop(0, pl.cdiv(V, cols), step, init)
    plgpu.store(o_ref.at[r], _lse(m, s), mask=rmask)


def _online(m, s, x):
    """The online-softmax pair (m, s) per row after one more tile x [rows, cols]: m the max so far,
    s the sum of exp(x - m), rescaled once by exp(m_old - m_new). exp(x - m) with m finite; an
    infinite or NaN m is the answer itself (_lse)."""
    m_new = jnp.maximum(m, jnp.max(x, axis=1))
    base = jnp.where(jnp.abs(m_new) < jnp.inf, m_new, 0.0)
    return m_new, s * jnp.exp(m - base) + jnp.sum(jnp.exp(x - base[:, None]), axis=1)


def _lse(m, s):
    return jnp.where(jnp.abs(m) < jnp.inf, m + jnp.log(s), m)


def cross_entropy_and_grad(x, labels, *, implementation: str | None = None, grad_dtype=None,
                           tile: tuple[int, int, int] | None = None):
    """(nll, d) of logits x [..., V] and int labels [...]: nll = logsumexp(x) - x[label] in float32
    [...] and d = softmax(x) - onehot(label) [..., V] in `grad_dtype` (x's by default), the
    gradient of nll in x. The softmax is exp(x - logsumexp(x)) in float32, rounded once to
    grad_dtype. A label outside [0, V) picks nothing (x[label] is taken as 0) and subtracts no
    one-hot. Autodiff: nll's derivative is softmax - onehot in closed form (d itself unless
    grad_dtype is narrower than x's; the kernel is never differentiated), and d is a constant
    (as lax.stop_gradient's output). `implementation` and `tile` as logsumexp's (default tile:
    XENT_TILE); the pallas form is the kernel of the module's note."""
    impl = resolve(implementation, IMPLEMENTATIONS, "cross_entropy_and_grad")
    x, labels = jnp.asarray(x), jnp.asarray(labels)
    if x.ndim == 0 or x.shape[-1] == 0 or x.shape[:-1] != labels.shape:
        raise ValueError(f"cross_entropy_and_grad: x [..., V] (V >= 1) and labels [...] need the same leading "
                         f"shape, got {x.shape} and {labels.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"cross_entropy_and_grad: x must be floating point and labels integer, got {x.dtype} "
                         f"and {labels.dtype}")
    grad_dtype = jnp.dtype(x.dtype if grad_dtype is None else grad_dtype)
    if not jnp.issubdtype(grad_dtype, jnp.floating):
        raise ValueError(f"cross_entropy_and_grad: grad_dtype must be floating point, got {grad_dtype}")
    lead, V = x.shape[:-1], x.shape[-1]
    x2, y2 = x.reshape(-1, V), labels.reshape(-1).astype(jnp.int32)
    if impl == "xla":
        nll, d = _xent_xla(x2, y2, grad_dtype)
    else:
        rows, cols, warps = XENT_TILE if tile is None else tile
        if rows < 1 or cols < 1 or cols & (cols - 1) or warps < 1 or warps & (warps - 1):
            raise ValueError(f"cross_entropy_and_grad: tile must be (rows >= 1, columns a power of two, warps a "
                             f"power of two), got {tile!r}")
        nll, d = _xent_pallas(x2, y2, (rows, cols, warps), grad_dtype)
    return nll.reshape(lead), d.reshape(x.shape)


def _xent_xla(x, y, grad_dtype):
    f = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    lse = jax.nn.logsumexp(f, axis=-1)
    onehot = jax.lax.broadcasted_iota(jnp.int32, f.shape, 1) == y[:, None]
    nll = lse - jnp.sum(jnp.where(onehot, f, 0.0), axis=-1)
    d = (jnp.exp(f - jax.lax.stop_gradient(lse)[:, None]) - onehot).astype(grad_dtype)
    return nll, jax.lax.stop_gradient(d)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _xent_pallas(x, y, tile, grad_dtype):
    return _xent_forward(x, y, tile, grad_dtype)


@_xent_pallas.defjvp
def _xent_jvp(tile, grad_dtype, primals, tangents):
    (x, y), (dx, _) = primals, tangents
    nll, d = _xent_forward(x, y, tile, grad_dtype)
    if jnp.finfo(grad_dtype).bits >= jnp.finfo(x.dtype).bits:
        dnll = d.astype(nll.dtype)
    else:  # d is rounded below x's precision: the derivative from x itself, as XLA's form's
        f = x.astype(nll.dtype)
        onehot = jax.lax.broadcasted_iota(jnp.int32, f.shape, 1) == y[:, None]
        lse = nll + jnp.sum(jnp.where(onehot, f, 0.0), axis=-1)
        dnll = jnp.exp(f - lse[:, None]) - onehot
    return (nll, d), (jnp.sum(dnll * dx.astype(nll.dtype), axis=-1), jnp.zeros_like(d))


def _xent_kernel(x_ref, y_ref, nll_ref, d_ref, *, M, V, rows, cols):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    r = jnp.arange(rows)
    rmask = pl.program_id(0) * rows + r < M
    dtype = nll_ref.dtype
    y = plgpu.load(y_ref.at[r], mask=rmask, other=-1)

    def load(start):
        c, cmask = columns(V, cols, start)
        mask = rmask[:, None] & cmask[None, :]
        return c, mask, plgpu.load(x_ref.at[r[:, None], c[None, :]], mask=mask, other=-jnp.inf).astype(dtype)

    def step(carry, x, c, mask):
        m, s, picked = carry
        picked = picked + jnp.sum(jnp.where((c[None, :] == y[:, None]) & mask, x, 0.0), axis=1)
        return (*_online(m, s, x), picked)

    def write(lse, x, c, mask):
        d = jnp.exp(x - lse[:, None]) - (c[None, :] == y[:, None]).astype(dtype)
        plgpu.store(d_ref.at[r[:, None], c[None, :]], d.astype(d_ref.dtype), mask=mask)

    init = (jnp.full((rows,), -jnp.inf, dtype), jnp.zeros((rows,), dtype), jnp.zeros((rows,), dtype))
    tiles = pl.cdiv(V, cols)
    if tiles == 1:  # the row in one tile: d from the values already loaded
        c, mask, x = load(0)
        m, s, picked = step(init, x, c, mask)
    else:
        def first(k, carry):
            c, mask, x = load(k * cols)
            return step(carry, x, c, mask)
        m, s, picked = jax.lax.fori_loop(0, tiles, first, init)
    lse = _lse(m, s)
    if tiles == 1:
        write(lse, x, c, mask)
    else:
        def second(k, _):
            c, mask, x = load(k * cols)
            write(lse, x, c, mask)
            return 0
        jax.lax.fori_loop(0, tiles, second, 0)
    plgpu.store(nll_ref.at[r], lse - picked, mask=rmask)


def _xent_forward(x, y, tile, grad_dtype):
    return tuple(by_rows(lambda x, y: _xent_local(x, y, tile, grad_dtype), [x, y], ["rows", "rows"],
                         ["rows", "rows"]))


def _xent_local(x, y, tile, grad_dtype):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    rows, cols, warps = tile
    M, V = x.shape
    call = lambda interpret: pl.pallas_call(  # noqa: E731
        functools.partial(_xent_kernel, M=M, V=V, rows=rows, cols=cols),
        grid=(pl.cdiv(M, rows),),
        in_specs=[pl.BlockSpec((rows, V), lambda i: (i, 0)), pl.BlockSpec((rows,), lambda i: (i,))],
        out_specs=[pl.BlockSpec((rows,), lambda i: (i,)), pl.BlockSpec((rows, V), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((M,), jnp.promote_types(x.dtype, jnp.float32)),
                   jax.ShapeDtypeStruct((M, V), grad_dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=warps),
        interpret=interpret, name="cross_entropy_and_grad")
    return run(call, x, y)


def _forward(x, tile):
    """[M, V] -> [M] float32 (at least) by the kernel (per shard of rows on several devices)."""
    return by_rows(lambda x: (_forward_local(x, tile),), [x], ["rows"], ["rows"])[0]


def _forward_local(x, tile):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    rows, cols, warps = tile
    M, V = x.shape
    out = jnp.promote_types(x.dtype, jnp.float32)
    call = lambda interpret: pl.pallas_call(  # noqa: E731
        functools.partial(_kernel, M=M, V=V, rows=rows, cols=cols),
        grid=(pl.cdiv(M, rows),),
        in_specs=[pl.BlockSpec((rows, V), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((rows,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((M,), out),
        compiler_params=plgpu.CompilerParams(num_warps=warps),
        interpret=interpret, name="logsumexp")
    return run(call, x)
