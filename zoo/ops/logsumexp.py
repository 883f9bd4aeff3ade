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
- None: "xla" (the kernel is opt-in until a GPU has timed it).

Under jit over several devices (rows sharded) each device runs the kernel on its own rows
(zoo.ops._pallas.by_rows).

x [..., V], any float dtype -> [...] in float32 (x's dtype if wider). The derivative is given in
closed form (d lse = sum(softmax(x) * dx)), so the kernel itself is never differentiated.
Special values as jax.nn.logsumexp: a row of -inf gives -inf, a +inf gives +inf, a NaN gives NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from zoo.ops._pallas import by_rows, columns, run

IMPLEMENTATIONS = ("xla", "pallas")
TILE = (4, 1024, 4)  # the kernel's rows per program, columns per step, warps (untuned: a GPU sweeps it)


def logsumexp(x, *, implementation: str | None = None, tile: tuple[int, int, int] | None = None):
    """log(sum(exp(x), -1)) in float32 (at least): see the module's note. `tile` (pallas only):
    (rows per program, columns per step (a power of two), warps), default TILE."""
    impl = "xla" if implementation is None else implementation
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"logsumexp: implementation must be one of {', '.join(IMPLEMENTATIONS)} or None; "
                         f"got {implementation!r}")
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
        m, s = carry
        c, cmask = columns(V, cols, k * cols)
        mask = rmask[:, None] & cmask[None, :]
        x = plgpu.load(x_ref.at[r[:, None], c[None, :]], mask=mask, other=-jnp.inf).astype(dtype)
        m_new = jnp.maximum(m, jnp.max(x, axis=1))
        # exp(x - m) with m finite; an infinite or NaN m is the answer itself (below)
        base = jnp.where(jnp.abs(m_new) < jnp.inf, m_new, 0.0)
        s = s * jnp.exp(m - base) + jnp.sum(jnp.exp(x - base[:, None]), axis=1)
        return m_new, s

    init = (jnp.full((rows,), -jnp.inf, dtype), jnp.zeros((rows,), dtype))
    m, s = jax.lax.fori_loop(0, pl.cdiv(V, cols), step, init)
    lse = jnp.where(jnp.abs(m) < jnp.inf, m + jnp.log(s), m)
    plgpu.store(o_ref.at[r], lse, mask=rmask)


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
