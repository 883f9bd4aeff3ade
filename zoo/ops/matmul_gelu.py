"""The MLP's GELU backward inside the matmul that makes its input: `matmul_gelu_grad(g, w, z)`.

A Transformer MLP is proj(GELU(z)) with z = fc(x). In its backward, the matmul g @ w.T (g the
proj output's gradient [tokens, H], w the proj kernel as Flax keeps it, [F, H]) writes GELU's
output gradient [tokens, F], and a pass of its own reads that and z again to write
z's gradient, dz = (g @ w.T) * GELU'(z), and the fc bias's gradient, dz's column sums. For
GPT-124M at B64 that pass is 1.2 GB per layer (14.6 GB per step, the largest that was left of the
step's passes: benchmarks/scripts/gpt_step_hlo.py). cuBLASLt has this as a matmul epilogue
(DGELU_BGRAD); XLA does not use it, and its Triton matmuls do not take the product in their
epilogue (the program compiled for an H200 here). `implementation="pallas"` is one Triton kernel
(Pallas): each program multiplies a [bm, K] block of g by a [bn, K] block of w in float32, then
multiplies by GELU'(z) of its [bm, bn] block of z as it writes dz, and writes the block's column
sums, summed over the row blocks after (the bias gradient). Measured on an H200 (2026-11-27,
benchmarks/scripts/pallas_kernels.py `mlp-dgelu`): at its best tiling level with XLA's form
(0.99x), 0.34-0.59x at the others; in the GPT step it lost 10% (GPTConfig.gelu_grad "pallas").

GELU is the tanh approximation (GPT-2's; zoo.ops.gelu.gelu_epilogue's), its derivative in
closed form in float32: 0.5 (1 + t) + 0.5 z (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 z^2), with
t = tanh(sqrt(2/pi) (z + 0.044715 z^3)).

implementation:
- "xla": g @ w.T in g's dtype (as autodiff's backward of a bf16 matmul writes it), then the
  product with GELU'(z) in float32, rounded to z's dtype, and float32 column sums of that;
- "pallas": the kernel above on an NVIDIA (CUDA) GPU (the product from the float32 accumulator,
  one rounding), Pallas's interpreter elsewhere (correct, slow: for tests);
- "cublaslt": cuBLASLt's matmul with its DGELU_BGRAD epilogue, called directly
  (zoo.ops.cublaslt): cuBLAS's matmul, GELU'(z) applied to its float32 accumulator, dz and its
  column sums written once. g, w and z go in z's dtype (bfloat16 or float16); cuBLASLt writes the
  column sums in that dtype too (its rule for bias gradients), returned as float32. On an NVIDIA
  GPU only (zoo.errors.UnavailableError elsewhere, with the reason).
- None: "xla" (the kernels are opt-in until measured faster than XLA's form on a GPU).

Shapes: g [M, K], w [N, K], z [M, N] -> (dz [M, N] in z's dtype, dbias [N] float32). The pallas
form needs the tile to divide them (M by bm, N by bn, K by bk). Under jit over several devices
(rows of g and z sharded) each device runs the kernel on its own rows and the column sums are
summed across devices (zoo.ops._pallas.by_rows). Not differentiable (it is itself a backward).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from zoo.errors import UnavailableError
from zoo.ops import cublaslt
from zoo.ops._pallas import by_rows, run

IMPLEMENTATIONS = ("xla", "pallas", "cublaslt")
# rows, columns, depth per step of the product; warps; pipeline stages: the fastest of seven on an
# H200 (2026-11-27, pallas_kernels.py, GPT-124M's B64 shapes): 1.12 ms, 0.99x XLA's cuBLAS matmul
# and its pass (277 TFLOP/s); (128, 128, 64, 4, 3), the default until then, 0.59x
TILE = (128, 64, 64, 4, 4)

_C = 0.7978845608028654  # sqrt(2 / pi)
_A = 0.044715


def gelu_tanh_grad(z):
    """d GELU(z) / dz of the tanh approximation, in closed form, in float32 at least."""
    z = z.astype(jnp.promote_types(z.dtype, jnp.float32))
    z2 = z * z
    return tanh_form_grad(z, jnp.tanh(z * (_C + _C * _A * z2)), z2)


def tanh_form_grad(z, t, z2):
    """GELU'(z) from t = tanh(sqrt(2/pi) (z + 0.044715 z^3)) and z^2 already at hand (the
    forward's, or recomputed): 0.5 (1 + t) + 0.5 z (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 z^2)."""
    return 0.5 + 0.5 * t + 0.5 * z * (1 - t * t) * (_C + 3 * _C * _A * z2)


def matmul_gelu_grad(g, w, z, *, implementation: str | None = None,
                     tile: tuple[int, int, int, int, int] | None = None):
    """(dz, dbias) = ((g @ w.T) * GELU'(z), column sums of dz): see the module's note. `tile`
    (pallas only): (rows, columns, depth per step, warps, stages), default TILE."""
    impl = "xla" if implementation is None else implementation
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"matmul_gelu_grad: implementation must be one of {', '.join(IMPLEMENTATIONS)} or None; "
                         f"got {implementation!r}")
    g, w, z = jnp.asarray(g), jnp.asarray(w), jnp.asarray(z)
    if g.ndim != 2 or w.ndim != 2 or z.ndim != 2 or w.shape[1] != g.shape[1] or z.shape != (g.shape[0], w.shape[0]):
        raise ValueError(f"matmul_gelu_grad: want g [M, K], w [N, K] and z [M, N], got {g.shape}, {w.shape} and "
                         f"{z.shape}")
    if not all(jnp.issubdtype(a.dtype, jnp.floating) for a in (g, w, z)):
        raise ValueError(f"matmul_gelu_grad: g, w and z must be floating point, got {g.dtype}, {w.dtype}, {z.dtype}")
    if impl == "xla":
        da = jnp.dot(g, w.astype(g.dtype).T)
        dz = (da.astype(jnp.float32) * gelu_tanh_grad(z)).astype(z.dtype)
        return dz, jnp.sum(dz.astype(jnp.float32), axis=0)
    if impl == "cublaslt":
        g, w = g.astype(z.dtype), w.astype(z.dtype)
        cublaslt.check(g, w, z)
        if not cublaslt.available():
            raise UnavailableError(f'matmul_gelu_grad: implementation "cublaslt" is not available here: '
                                   f'{cublaslt.unavailable_reason()}')
        return tuple(by_rows(_cublaslt_local, [g, w, z], ["rows", "whole", "rows"], ["rows", "sum"]))
    bm, bn, bk, warps, stages = TILE if tile is None else tile
    (M, K), N = g.shape, w.shape[0]
    pow2 = all(v >= 1 and not v & (v - 1) for v in (bm, bn, bk, warps))
    if not pow2 or stages < 1 or M % bm or N % bn or K % bk or min(bm, bn, bk) < 16:
        raise ValueError(f"matmul_gelu_grad: tile (rows, columns, depth, warps, stages) must be powers of two "
                         f">= 16 (warps: any power of two, stages >= 1) dividing M={M}, N={N}, K={K}; got "
                         f"{(bm, bn, bk, warps, stages)!r} (implementation='xla' takes any shape)")
    return tuple(by_rows(lambda g, w, z: _local(g, w.astype(g.dtype), z, (bm, bn, bk, warps, stages)),
                         [g, w, z], ["rows", "whole", "rows"], ["rows", "sum"]))


def _cublaslt_local(g, w, z):
    dz, dbias = cublaslt.dgelu(g, w, z)
    return dz, dbias.astype(jnp.float32)


def fit_tile(M: int, N: int, K: int, tile: tuple[int, int, int, int, int] | None = None):
    """`tile` (default TILE) with each block size halved until it divides M, N, K, or None where
    one would go below 16."""
    bm, bn, bk, warps, stages = TILE if tile is None else tile
    sizes = []
    for b, n in ((bm, M), (bn, N), (bk, K)):
        while b > 16 and n % b:
            b //= 2
        if n % b:
            return None
        sizes.append(b)
    return (*sizes, warps, stages)


def _kernel(g_ref, w_ref, z_ref, dz_ref, part_ref, *, K, bm, bn, bk):
    from jax.experimental import pallas as pl

    def step(k, acc):
        a = g_ref[:, pl.ds(k * bk, bk)]
        b = w_ref[:, pl.ds(k * bk, bk)]
        return acc + jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, K // bk, step, jnp.zeros((bm, bn), jnp.float32))
    dz = (acc * gelu_tanh_grad(z_ref[...])).astype(dz_ref.dtype)
    dz_ref[...] = dz
    part_ref[...] = jnp.sum(dz.astype(jnp.float32), axis=0, keepdims=True)


def _local(g, w, z, tile):
    """The kernel on this device's rows (the tile fitted to them: a shard's rows may not divide by
    the tile the whole did; none fits, XLA's form)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    (M, K), N = g.shape, w.shape[0]
    tile = fit_tile(M, N, K, tile)
    if tile is None:
        return matmul_gelu_grad(g, w, z, implementation="xla")
    bm, bn, bk, warps, stages = tile
    call = lambda interpret: pl.pallas_call(  # noqa: E731
        functools.partial(_kernel, K=K, bm=bm, bn=bn, bk=bk),
        # the column blocks first: programs launched together share g's row block (in the L2, as
        # all of w is); rows first, all of g (GPT-124M: 100 MB) would stream from memory per column
        grid=(N // bn, M // bm),
        in_specs=[pl.BlockSpec((bm, K), lambda j, i: (i, 0)), pl.BlockSpec((bn, K), lambda j, i: (j, 0)),
                  pl.BlockSpec((bm, bn), lambda j, i: (i, j))],
        out_specs=[pl.BlockSpec((bm, bn), lambda j, i: (i, j)), pl.BlockSpec((1, bn), lambda j, i: (i, j))],
        out_shape=[jax.ShapeDtypeStruct((M, N), z.dtype), jax.ShapeDtypeStruct((M // bm, N), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret, name="matmul_gelu_grad")
    dz, parts = run(call, g, w, z)
    return dz, jnp.sum(parts, axis=0)
