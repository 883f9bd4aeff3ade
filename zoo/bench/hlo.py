"""What a compiled XLA program launches, read from its text (`jax.jit(f).lower(...).compile().as_text()`),
and compiling a program for a GPU on a machine without one.

`launches(text)`: each op of the entry computation that runs as a kernel (a fusion, a cuBLAS or cuDNN
call, a copy), with the bytes it reads and writes, the FLOPs of a matmul, and where in the model
it comes from (the op's `op_name` metadata: forward or backward, and the module path with layer
numbers folded, `stack/block_*/mlp/fc`). `traffic(launches)` adds them up by kind and by source.
The bytes are the program's own accounting: a fusion reads each operand once and writes its
outputs (an operand that the fusion only gathers or slices counts as what it takes), which is what
an elementwise or reduction kernel moves when it runs near the memory's bandwidth; a matmul's
time is its FLOPs. So a change to the model that XLA compiles to fewer bytes moved can be seen
before any device runs it.

`compile_for_gpu(fn, *args, target="h200")`: XLA's GPU compiler without a GPU (deviceless
ahead-of-time compilation through a PJRT topology made from a GpuTargetConfig, XLA's own format
for a device's properties; needs JAX's CUDA plugin installed, `pip install jax-cuda13-plugin
jax-cuda13-pjrt` at jax's version, and no GPU). It runs XLA's GPU passes, fusion included, as on
the device, except those that need one: no autotuning, so matmuls keep cuBLAS's default algorithm
(with `xla_gpu_enable_triton_gemm=false`, as autotuning picks on an H200 for GPT-124M: every
matmul a cuBLAS call), and cuDNN's graphs are not built (their workspaces are not sized). Checked
against the program an H200 compiled for the same GPT-124M step (2026-11-27, JAX 0.11.2 there,
0.12.0.1 here): the same fusions of 300 MB and up, op for op, except one concatenation per layer
that the device's cuBLAS autotuning (a split-K matmul) added.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections import defaultdict

DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
               "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8,
               "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
# an instruction: `%name = SHAPE opcode(operands), attributes`, SHAPE a tuple or one array
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*?)\)(.*)$")
_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")  # a header, at column 0
# ops that launch nothing: views, tuples, constants, control
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "add-dependency",
         "opt-barrier", "partition-id", "replica-id"}
_TAKES_PART = {"gather", "slice", "dynamic-slice"}  # a fusion operand only these read counts as their output
_PASS_THROUGH = {"convert", "bitcast", "reshape", "copy"}  # ... seen through these

# devices XLA can compile for without one (GpuTargetConfigProto text; the spec sheets' figures)
_SM90 = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 19 }}
device_description_str: "{name}"
"""
GPU_TARGETS = {
    "h100": _SM90.format(bandwidth=3352320000000, memory=84978434048, name="NVIDIA H100 80GB HBM3"),
    "h200": _SM90.format(bandwidth=4800000000000, memory=150754820096, name="NVIDIA H200"),
}


def array_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape string (`bf16[64,1024]{1,0}`, or a tuple of them)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * DTYPE_BYTES[dtype]
    return total


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    op: str
    operands: list[str]
    args: str          # the text inside the op's parentheses (a parameter's number)
    attrs: str


@dataclasses.dataclass
class Launch:
    """One kernel-launching op of a compiled program's entry computation."""

    name: str
    kind: str          # fusion (kLoop / kInput / ...), gemm, attention, custom-call:TARGET, copy, ...
    read: int          # bytes
    written: int       # bytes
    flops: float       # a matmul's (0 for the rest)
    pass_: str         # forward | backward | other (an optimizer update, the loss's plumbing)
    source: str        # the op_name path, layer numbers folded: stack/block_*/mlp/fc
    aux: int = 0       # a matmul's epilogue's bytes besides its operands and product: cuBLASLt's
                       # GELU_AUX writes the GELU's input out for the backward (of `written`), its
                       # DGELU_BGRAD (zoo.ops.cublaslt) reads it back (of `read`)

    @property
    def bytes(self) -> int:
        return self.read + self.written


def parse_computations(text: str) -> tuple[dict[str, list[Instr]], str]:
    """{computation name: its instructions}, and the entry computation's name."""
    comps, entry, current = {}, "", None
    for line in text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m:
                current = comps.setdefault(m.group(2), [])
                entry = m.group(2) if m.group(1) else entry
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            name, shape, op, args, attrs = m.groups()
            current.append(Instr(name, shape, op, re.findall(r"%([\w.\-]+)", args), args, attrs))
    if not entry:
        raise ValueError("no ENTRY computation in this HLO text (pass Compiled.as_text())")
    return comps, entry


def _source(attrs: str) -> tuple[str, str]:
    m = re.search(r'op_name="([^"]*)"', attrs)
    if not m:
        return "other", "(no op_name)"
    path = m.group(1)
    pass_ = "backward" if "transpose(" in path else "forward" if "jvp(" in path else "other"
    parts = [p for p in path.split("/") if not re.match(r"^(jit|pjit|jvp|transpose|vmap|remat|checkpoint)\(", p)]
    parts = [re.sub(r"_\d+$", "_*", p) for p in parts[:-1]] or parts  # drop the primitive, fold layer numbers
    return pass_, "/".join(parts)


def _operand_reads(comps: dict[str, list[Instr]], called: str, operand_shapes: list[str]) -> int:
    """Bytes a fusion reads: each operand's size, or, for an operand the fused computation only
    gathers or slices, what those take."""
    body = comps.get(called, [])
    index = {ins.name: int(ins.args) for ins in body if ins.op == "parameter"}
    users = defaultdict(list)
    for ins in body:
        for o in ins.operands:
            users[o].append(ins)

    def taken(name: str, depth: int = 0) -> int | None:
        """Bytes the fusion takes of value `name` if it only gathers or slices it (through
        converts and bitcasts), else None."""
        u = users.get(name, [])
        if not u or depth > 8:
            return None
        total = 0
        for x in u:
            if x.op in _TAKES_PART and x.operands[0] == name:
                total += array_bytes(x.shape)
            elif x.op in _PASS_THROUGH and (t := taken(x.name, depth + 1)) is not None:
                total += t
            else:
                return None
        return total

    total = 0
    for i, shape in enumerate(operand_shapes):
        pname = next((n for n, k in index.items() if k == i), None)
        t = taken(pname) if pname else None
        total += array_bytes(shape) if t is None else min(t, array_bytes(shape))
    return total


def _dot_flops(out_shape: str, lhs_shape: str, lhs_contracting: list[int]) -> float:
    out = 1
    for d in _dims(out_shape):
        out *= d
    lhs = _dims(lhs_shape)
    k = 1
    for d in lhs_contracting:
        k *= lhs[d]
    return 2.0 * out * k


def launches(text: str) -> list[Launch]:
    """The kernel-launching ops of a compiled program's entry computation, in program order."""
    comps, entry = parse_computations(text)
    shapes = {}
    out = []
    for ins in comps[entry]:
        shapes[ins.name] = ins.shape
        if ins.op in _FREE:
            continue
        operand_shapes = [shapes.get(o, "") for o in ins.operands]
        called = (re.search(r"calls=%?([\w.\-]+)", ins.attrs) or [None, ""])[1]
        kind, flops, aux = ins.op, 0.0, 0
        written = array_bytes(ins.shape)
        if ins.op == "fusion":
            kind = "fusion:" + ((re.search(r"kind=(\w+)", ins.attrs) or [None, "?"])[1])
            read = _operand_reads(comps, called, operand_shapes)
            dots = [d for d in comps.get(called, []) if d.op == "dot"]
            if dots:  # a matmul XLA emits itself (Triton)
                d = dots[0]
                lhs = next((x.shape for x in comps[called] if x.name == d.operands[0]), "")
                dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", d.attrs).group(1)
                contracting = [int(c) for c in dims.split(",") if c]
                kind, flops = "gemm", _dot_flops(d.shape, lhs, contracting)
        else:
            read = sum(array_bytes(s) for s in operand_shapes)
        if ins.op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', ins.attrs).group(1)
            kind = f"custom-call:{target}"
            outs = _ARRAY.findall(ins.shape)
            if target == "zoo_cublaslt_dgelu":
                # zoo.ops.cublaslt: cuBLASLt's matmul g [M, K] x w^T (w [N, K] or [K, N]), its epilogue
                # reading z [M, N]
                (M, K), N = _dims(operand_shapes[0]), _dims(operand_shapes[2])[1]
                kind, flops, aux = "gemm", 2.0 * M * N * K, array_bytes(operand_shapes[2])
            elif target == "zoo_cublaslt_wgrad":
                # zoo.ops.cublaslt: cuBLASLt's matmul x [M, I]^T x dy [M, F], its epilogue summing dy
                (M, I), F = _dims(operand_shapes[0]), _dims(operand_shapes[1])[1]
                kind, flops = "gemm", 2.0 * M * I * F
            elif "cublas" in target:
                at = ins.attrs.index("backend_config=") + len("backend_config=")
                cfg = json.JSONDecoder().raw_decode(ins.attrs[at:])[0]  # the JSON object, whatever follows
                dims = cfg["gemm_backend_config"]["dot_dimension_numbers"]
                first = f"{outs[0][0]}[{outs[0][1]}]"
                kind = "gemm"
                flops = _dot_flops(first, operand_shapes[0], [int(c) for c in dims["lhs_contracting_dimensions"]])
                # the product and any epilogue output (GELU_AUX), not the workspace (the last, s8)
                products = outs[:-1] if len(outs) > 1 and outs[-1][0] == "s8" else outs
                written = sum(array_bytes(f"{t}[{d}]") for t, d in products)
                aux = written - array_bytes(first)
            elif "triton" in target and "matmul_gelu_grad" in ins.attrs:
                # zoo.ops.matmul_gelu's kernel (Pallas): a matmul g [M, K] x w [N, K]^T inside
                (M, K), N = _dims(operand_shapes[0]), _dims(operand_shapes[1])[0]
                flops = 2.0 * M * N * K
            elif "cudnn" in target and ("fmha" in target or "Softmax" in target):
                kind = "attention"
                written = sum(array_bytes(f"{t}[{d}]") for t, d in outs if t != "u8")
        pass_, source = _source(ins.attrs)
        out.append(Launch(ins.name, kind, read, written, flops, pass_, source, aux))
    return out


def traffic(ls: list[Launch], by: str = "kind") -> list[dict]:
    """Launches added up by `kind`, `source` or `pass` (largest bytes first): count, GB read and
    written, matmul TFLOP."""
    agg = defaultdict(lambda: {"count": 0, "gb": 0.0, "tflop": 0.0})
    for x in ls:
        key = {"kind": x.kind, "source": f"{x.pass_[:3]} {x.source}", "pass": x.pass_}[by]
        a = agg[key]
        a["count"] += 1
        a["gb"] += x.bytes / 1e9
        a["tflop"] += x.flops / 1e12
    return [{by: k, **v} for k, v in sorted(agg.items(), key=lambda kv: (-kv[1]["gb"] - kv[1]["tflop"], kv[0]))]


@contextlib.contextmanager
def tracing_for_gpu(target: str = "h200"):
    """Within it, JAX traces cuDNN attention for `target` on a machine with no cuDNN library: JAX
    asks the library for its version before it emits the call; answered with the target's (XLA
    compiles the call without building cuDNN's graph). zoo.ops.cublaslt's call traces too
    (compiling_without_device). compile_for_gpu lowers within it; trace (jax.eval_shape) a
    model's init within it too."""
    from zoo.ops import cublaslt

    with cublaslt.compiling_without_device():
        yield from _cudnn_version_for(target)


def _cudnn_version_for(target: str):
    m = re.search(r"dnn_version_info \{ major: (\d+) minor: (\d+)", GPU_TARGETS[target])
    version = int(m.group(1)) * 10000 + int(m.group(2)) * 100
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError:  # another JAX layout: leave it be
        yield
        return
    saved = fa.check_cudnn_version
    fa.check_cudnn_version = lambda: version
    try:
        yield
    finally:
        fa.check_cudnn_version = saved


# matmuls as cuBLAS calls, as autotuning picks them on an H200 for GPT-124M (with no autotuning
# XLA would emit them with Triton at a default tiling)
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def compile_for_gpu(fn, *args, target: str = "h200", compiler_options: dict | None = None, **jit_kwargs):
    """jax.jit(fn, **jit_kwargs) compiled for one GPU of `target` (GPU_TARGETS) here, without one: a
    jax.stages.Compiled to read, not run (`.as_text()`, the program; `.memory_analysis()`, its
    buffers: temp_size_in_bytes, what the device must find free); args are arrays or
    jax.ShapeDtypeStruct (pytrees of them).
    compiler_options: XLA options for this compile (default: GPU_COMPILER_OPTIONS)."""
    import jax
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if target not in GPU_TARGETS:
        raise ValueError(f"unknown GPU target {target!r}; known: {', '.join(sorted(GPU_TARGETS))}")
    try:
        topo = topologies.get_topology_desc(target, platform="cuda", target_config=GPU_TARGETS[target],
                                            topology="1x1x1")
    except Exception as e:  # noqa: BLE001 - no plugin, or one that cannot compile without a device
        raise RuntimeError(
            "compiling for a GPU without one needs JAX's CUDA plugin at jax's version (pip install "
            f"jax-cuda13-plugin=={jax.__version__} jax-cuda13-pjrt=={jax.__version__}) and, on a machine "
            "with no GPU, JAX_PLATFORMS=cpu set before JAX starts (else the plugin's start-up looks for "
            "CUDA's libraries, cuDNN among them, and JAX drops the plugin where they are missing): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    mesh = Mesh(topo.devices[:1], ("d",))
    sharding = NamedSharding(mesh, PartitionSpec())
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    options = GPU_COMPILER_OPTIONS if compiler_options is None else compiler_options
    # the mesh's abstract device (the target's kind) tells Pallas's Triton lowering which GPU it
    # lowers for, where it would otherwise ask a local GPU
    with tracing_for_gpu(target), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        lowered = jax.jit(fn, **jit_kwargs).lower(*abstract)
    return lowered.compile(compiler_options=options)
