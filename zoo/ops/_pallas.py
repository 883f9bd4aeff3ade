"""What zoo.ops's Pallas (Triton) kernels share: where they run, and their power-of-two tiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def run(call, *args):
    """call(interpret)(*args): the Triton kernel where the program is lowered for a CUDA GPU,
    Pallas's interpreter elsewhere (correct, slow; chosen as it lowers: jax.lax.platform_dependent)."""
    return jax.lax.platform_dependent(*args, cuda=call(False), default=call(True))


def on_cuda_gpu() -> bool:
    """Whether JAX's default backend is an NVIDIA (CUDA) GPU: where the kernels run as Triton
    kernels, so an op's "auto" implementation picks them (anywhere else Pallas would interpret
    them, slowly). Decided as jax.default_backend() is, as zoo.ops.attention's auto decides."""
    if jax.default_backend() != "gpu":
        return False
    device = jax.devices()[0]
    version = getattr(getattr(device, "client", None), "platform_version", "") or ""
    return "nvidia" in getattr(device, "device_kind", "").lower() or "cuda" in version.lower()


def resolve(implementation: str | None, implementations, op: str, arg: str = "implementation") -> str:
    """An op's implementation name, checked: None -> "xla"; "auto" -> "pallas" on an NVIDIA GPU
    (on_cuda_gpu), "xla" elsewhere; anything not in `implementations` a ValueError naming `op`
    and its argument `arg`."""
    if implementation is not None and implementation not in implementations:
        raise ValueError(f"{op}: {arg} must be one of {', '.join(implementations)} or None; "
                         f"got {implementation!r}")
    if implementation == "auto":
        return "pallas" if on_cuda_gpu() else "xla"
    return "xla" if implementation is None else implementation


def columns(n: int, width: int | None = None, start=0):
    """(indices, mask) of a tile's columns: Triton's arrays have power-of-two sizes, so a tile
    `width` wide (default: n's next power of two) from `start`, masked to the n columns there are."""
    from jax.experimental import pallas as pl

    width = pl.next_power_of_2(n) if width is None else width
    cols = start + jnp.arange(width)
    return cols, cols < n


def by_rows(fn, arrays, kinds, out_kinds):
    """fn(*arrays) -> tuple of arrays, computed per shard of rows when the program is partitioned
    over several devices (jit over a mesh): each array's kind says how it splits, "rows" (its
    leading axis is rows, independent of each other) or "whole" (every shard needs all of it); each
    output's, "rows" or "sum" (a sum over all rows: each shard's own, then summed over the shards).

    A Pallas kernel is an opaque custom call to XLA's partitioner, which would gather its inputs
    onto every device and run it whole there (on 8 data-parallel GPUs: 8x the work, and the
    activations all-gathered). Here the rows stay where the first "rows" array's leading axis is
    sharded (anything else each shard gathers: a sharded last axis, rows that do not split evenly),
    with jax.experimental.custom_partitioning; on one device fn is inlined as it is; under
    jax.vmap, fn is batched as it is (unpartitioned)."""
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.sharding import NamedSharding, PartitionSpec

    @custom_partitioning
    def call(*arrays):
        return tuple(fn(*arrays))

    def row_axes(mesh, arg_shapes):
        first = next(s for s, k in zip(arg_shapes, kinds) if k == "rows")
        spec = first.sharding.spec if isinstance(first.sharding, NamedSharding) else ()
        axes = spec[0] if len(spec) else None
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        shards = 1
        for name in names:
            shards *= mesh.shape[name]
        return axes if names and first.shape[0] % shards == 0 else None

    def partition(mesh, arg_shapes, result_shape):
        axes = row_axes(mesh, arg_shapes)
        spec = lambda ndim, kind: (PartitionSpec(axes, *(None,) * (ndim - 1)) if kind == "rows"  # noqa: E731
                                   else PartitionSpec())
        args = tuple(NamedSharding(mesh, spec(len(s.shape), k)) for s, k in zip(arg_shapes, kinds))
        results = tuple(NamedSharding(mesh, spec(len(s.shape), k)) for s, k in zip(result_shape, out_kinds))

        def lower_fn(*local):
            outs = fn(*local)
            return tuple(jax.lax.psum(o, axes) if k == "sum" and axes is not None else o
                         for o, k in zip(outs, out_kinds))
        return mesh, lower_fn, results, args

    def infer(mesh, arg_shapes, result_shape):  # the same shardings, for the older GSPMD partitioner
        return partition(mesh, arg_shapes, result_shape)[2]

    def factors(prefix, i, ndim, kind):
        dims = [f"{prefix}{i}d{j}" for j in range(ndim)]
        return " ".join(["m", *dims[1:]] if kind == "rows" else dims)

    rule = (", ".join(factors("a", i, a.ndim, k) for i, (a, k) in enumerate(zip(arrays, kinds))) + " -> " +
            ", ".join(factors("o", i, len(s.shape), k) for i, (s, k) in
                      enumerate(zip(jax.eval_shape(fn, *arrays), out_kinds))))
    call.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule)

    # custom_partitioning has no batching rule: under jax.vmap, fn batched as it is (Pallas
    # batches a kernel by a grid axis of its own), unpartitioned
    @jax.custom_batching.custom_vmap
    def batchable(*arrays):
        return call(*arrays)

    @batchable.def_vmap
    def _(axis_size, in_batched, *arrays):
        arrays = [a if b else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, b in zip(arrays, in_batched)]
        outs = tuple(jax.vmap(fn)(*arrays))
        return outs, (True,) * len(outs)

    return batchable(*arrays)
