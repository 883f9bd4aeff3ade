"""Native CPU kernels: C++ sources in zoo/ops/csrc, compiled on first use, called through jax.ffi.

The first call compiles the source with the machine's C++ compiler (CXX, else g++, c++ or
clang++; -O3 -march=native, against jax.ffi.include_dir()) into a shared library in the cache
(ZOO_CACHE_DIR, else ~/.cache/zoo; about 5 s once per machine, source, compiler and jaxlib) and
registers its handlers for the CPU; ZOO_NATIVE_CXXFLAGS adds flags (e.g. -mno-avx512f, to build the
AVX2 code on an AVX-512 machine). Nothing is downloaded. Where there is no compiler, or it
fails, `available()` is False, with the reason in `unavailable_reason()`, and callers fall back
to XLA code. ZOO_NATIVE=0 turns the kernels off. ZOO_NUM_THREADS caps their threads (default: the
CPUs this process may run on): one pool for the process, whose threads spin for ZOO_NATIVE_SPIN_US
microseconds (default 1000) after each call, then sleep (csrc/simd.h says why).

Kernels (all sources in csrc/ build into one library):
- `attention_forward` / `attention_backward`, FlashAttention in float32 (csrc/attention.cc):
  q [B, T, N, D], k, v [B, S, K, D], the head dim a multiple of 16; causal, window, boolean masks
  and an additive bias (with its gradient); bfloat16 inputs on Intel AMX tiles where the CPU and
  OS allow it (ZOO_NATIVE_AMX=0: not; then widened to float32).
- `gibbs_chain`, a Bernoulli RBM's block-Gibbs chain in float32 (csrc/gibbs.cc), with the uniforms
  of zoo.ops.gibbs's "hash" method.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("attention.cc", "gibbs.cc")  # compiled together; they include simd.h
HEAD_DIM_MULTIPLE = 16  # the kernel's vectors: 16 floats with AVX-512, 8 without
# Tile sizes, measured on 2 cores (AVX-512) at B1 N8 D64 S1024-4096 (benchmarks/results/README.md):
# forward 128 rows: 64 slower, 256 equal full and 4-7% slower causal; 512 keys: 256 and 1024 equal
# or slower; backward 128 rows: 64 equal at S1024 and 5-10% slower at S4096, 256 slower causal.
FORWARD_ROWS = 128
BACKWARD_ROWS = 128
KEY_BLOCK = 512
KEY_ALIGN = 32  # tiles start and end on multiples of this many keys (COL_ALIGN in the source)
N_STATICS = 8   # is_causal, window, scale, block_q, block_k, has_mask, has_bias, bias_grad
CHAIN_ROWS = 128  # chains per task of gibbs_chain
TARGETS = {"zoo_attention_forward": "ZooAttentionForward",
           "zoo_attention_forward_bf16": "ZooAttentionForwardBf16",
           "zoo_attention_backward_bf16": "ZooAttentionBackwardBf16",
           "zoo_attention_backward": "ZooAttentionBackward",
           "zoo_gibbs_chain": "ZooGibbsChain"}

_lock = threading.RLock()  # load_once (re-entrant: a loader may load another library)
_state: dict = {}  # "lib": the loaded library, or "error": why not


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded here (the message says why)."""


def cache_dir() -> Path:
    return Path(os.environ.get("ZOO_CACHE_DIR") or Path.home() / ".cache" / "zoo") / "native"


def _compiler() -> str | None:
    return os.environ.get("CXX") or next(
        (c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


def self_contained() -> list[str]:
    """Link flags that keep a library's copies of static libraries to itself (GNU ld, lld; Linux).

    A toolchain may link libstdc++ statically into the library (the lent GPU machines' /opt/gcc
    g++ does). Its symbols are then exported, and the process's libstdc++.so.6 (loaded first, by
    jaxlib) interposes some of them, so the library runs two libstdc++ copies at once. On the
    2026-11-28 lease that crashed the cuDNN frontend as it formatted an int into a stream.
    --exclude-libs,ALL keeps the archive's symbols local, so the library uses its own copy whole."""
    return ["-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else []


def _flags() -> list[str]:
    return ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno",
            "-I", jax.ffi.include_dir(), *self_contained(), *os.environ.get("ZOO_NATIVE_CXXFLAGS", "").split()]


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and feature flags (Linux), else the platform."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def compiler_version(cxx: str | None, error: type[Exception]) -> tuple[str, str]:
    """(the compiler, what `--version` prints); `error` where there is none or it does not run."""
    cxx = cxx or _compiler()
    if not cxx:
        raise error("no C++ compiler found (set CXX, or install g++)")
    try:
        return cxx, subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise error(f"C++ compiler {cxx!r} does not run: {e}") from e


def compile_into_cache(cxx: str, args: list[str], sources: list[Path], out: Path, note: str,
                       error: type[Exception], libs: tuple[str, ...] = ()) -> Path:
    """`cxx args sources -o out libs` unless `out` exists: into a temporary file, then an atomic rename,
    so parallel builds (test workers) cannot clash; `error` with the compiler's message if it fails."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    names = ", ".join(f.name for f in sources)
    print(f"zoo: compiling {note} ({names}) with {cxx} (once per machine) into {out.parent}",
          file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cxx, *args, *map(str, sources), "-o", tmp, *libs], capture_output=True, text=True, timeout=900)
        if r.returncode:
            raise error(f"compiling {names} with {cxx} failed:\n{r.stderr[-3000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load_once(state: dict, open_library, error: type[Exception]):
    """open_library() once per process: its library kept in state["lib"]; its failure (`error`, or
    the loader's OSError / AttributeError) kept as state["error"] and raised again as `error`."""
    with _lock:
        if "lib" in state:
            return state["lib"]
        if "error" in state:
            raise error(state["error"])
        try:
            state["lib"] = open_library()
        except (error, OSError, AttributeError) as e:
            state["error"] = str(e)
            raise error(str(e)) from e
        return state["lib"]


def open_cuda_call(build, init: str, handlers: dict[str, str], fallback: str, error: type[Exception]):
    """(library, version): the direct calls' library (zoo.ops.cudnn_direct, zoo.ops.cublaslt) built
    (build() -> its path) and loaded, its `init` run (it finds the CUDA library it calls: the copy
    JAX's plugin loaded, else the one at `fallback`; 0 and the reason if none), each of its
    `handlers` ({FFI target: the handler's symbol}) registered for CUDA. `error` with init's reason where it fails, or where
    JAX's default backend is not an NVIDIA GPU (checked first)."""
    from zoo.ops._pallas import on_cuda_gpu

    if not on_cuda_gpu():
        raise error(f"needs an NVIDIA GPU (JAX's default backend is {jax.default_backend()!r})")
    lib = ctypes.CDLL(str(build()))
    reason = ctypes.create_string_buffer(1024)
    getattr(lib, init).restype = ctypes.c_int64
    version = getattr(lib, init)(fallback.encode(), reason, ctypes.c_int64(len(reason)))
    if not version:
        raise error(reason.value.decode(errors="replace"))
    register_cuda(lib, handlers)
    return lib, version


def register_cuda(lib, handlers: dict[str, str]) -> None:
    """Each of `handlers` ({FFI target: symbol in lib}) registered as a CUDA FFI target."""
    for target, handler in handlers.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, handler)), platform="CUDA")


def why_not(load, state: dict, error: type[Exception]) -> str | None:
    """None if load() works (a library loaded once, by load_once), else why not."""
    try:
        load()
        return None
    except error:
        return state.get("error")


def build(cxx: str | None = None) -> Path:
    """The compiled library's path, compiling it first if the cache lacks it (~10 s)."""
    cxx, version = compiler_version(cxx, NativeUnavailable)
    texts = [f.read_text() for f in sorted(CSRC.iterdir()) if f.suffix in (".cc", ".h")]
    key = hashlib.sha256("\0".join([*texts, cxx, version, " ".join(_flags()),
                                    jax.__version__, _cpu_id()]).encode()).hexdigest()[:16]
    return compile_into_cache(cxx, _flags(), [CSRC / f for f in SOURCES], cache_dir() / f"kernels-{key}.so",
                              "the native kernels", NativeUnavailable)


def _open():
    if os.environ.get("ZOO_NATIVE", "1") == "0":
        raise NativeUnavailable("turned off by ZOO_NATIVE=0")
    lib = ctypes.CDLL(str(build()))
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib


def load():
    """Build (if needed), load and register the kernels once per process; NativeUnavailable if not."""
    return load_once(_state, _open, NativeUnavailable)


def unavailable_reason() -> str | None:
    return why_not(load, _state, NativeUnavailable)


def available() -> bool:
    return unavailable_reason() is None


def _attrs(is_causal, window, scale, block_q, block_k, has_mask, has_bias, bias_grad):
    """The kernels' shared attributes, and bias_grad (the backward's own)."""
    left, right = window if window is not None else (-1, -1)
    return dict(is_causal=bool(is_causal), window_left=np.int64(left), window_right=np.int64(right),
                scale=np.float32(scale), block_q=np.int64(block_q), block_k=np.int64(block_k),
                has_mask=bool(has_mask), has_bias=bool(has_bias)), bias_grad


def by_batch(fn, n_arrays, rule, *, n_statics=N_STATICS, n_batched=None):
    """fn(*arrays, *statics) as custom_partitioning over the batch axis: under jit over a mesh each
    device runs the kernel on its own examples, where a custom call would otherwise be given whole,
    gathered arrays on every device. The first n_batched arrays (default: all) and every result
    lead with the batch axis; the other arrays, and the other axes (named in `rule` after the
    first), are replicated. One device and pmap call fn directly."""
    n_batched = n_arrays if n_batched is None else n_batched
    cp = custom_partitioning(fn, static_argnums=tuple(range(n_arrays, n_arrays + n_statics)))

    def batch(mesh, arg_shapes):
        s = arg_shapes[0].sharding
        spec = getattr(s, "spec", None)
        return NamedSharding(mesh, PartitionSpec(spec[0] if spec else None))

    def results(sh, result_shape):  # one sharding per result (a bare one for a single array)
        return tuple(sh for _ in result_shape) if isinstance(result_shape, (tuple, list)) else sh

    def infer(*args):
        *_, mesh, arg_shapes, result_shape = args
        return results(batch(mesh, arg_shapes), result_shape)

    def partition(*args):
        *statics, mesh, arg_shapes, result_shape = args
        sh, whole = batch(mesh, arg_shapes), NamedSharding(mesh, PartitionSpec())
        return (mesh, lambda *arrays: fn(*arrays, *statics), results(sh, result_shape),
                tuple(sh if i < n_batched else whole for i in range(len(arg_shapes))))

    names = rule.replace(",", " ").replace("->", " ").split()
    others = tuple(n for i, n in enumerate(names) if n != "b" and n not in names[:i])  # first-seen order
    cp.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                     need_replication_factors=others)
    return cp


def _forward(q, k, v, mask, bias, *statics):
    (B, T, N, _), K = q.shape, k.shape[2]
    bf16 = q.dtype == jnp.bfloat16  # then k and v are too (attention_forward)
    out = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, K, T, N // K), jnp.float32))
    call = jax.ffi.ffi_call("zoo_attention_forward_bf16" if bf16 else "zoo_attention_forward", out,
                            vmap_method="sequential")
    return call(q, k, v, mask, bias, **_attrs(*statics)[0])


def _dbias_shape(q, k, bias, bias_grad):
    """[B, K, G|1, T|1, S|1]: what each (batch, kv head) task sees of the bias's gradient."""
    (B, _, N, _), K = q.shape, k.shape[2]
    if not bias_grad:
        return (B, 1, 1, 1, 1)  # not written
    return (B, K, N // K if bias.shape[1] > 1 else 1, bias.shape[2], bias.shape[3])


def _backward(q, k, v, mask, o, lse, do, bias, *statics):  # bias last: it may be unbatched
    attrs, bias_grad = _attrs(*statics)
    out = tuple(jax.ShapeDtypeStruct(x.shape, q.dtype) for x in (q, k, v))
    out += (jax.ShapeDtypeStruct(_dbias_shape(q, k, bias, bias_grad), jnp.float32),)
    bf16 = q.dtype == jnp.bfloat16  # then k, v, o and do are too (attention_backward)
    call = jax.ffi.ffi_call("zoo_attention_backward_bf16" if bf16 else "zoo_attention_backward", out,
                            vmap_method="sequential")
    return call(q, k, v, mask, bias, o, lse, do, **attrs, bias_grad=bool(bias_grad))


_QKV = "b t n d, b s k d, b s k d"
_MASK = "b x y z"  # [B, N|1, T|1, S|1]: factors of its own (1 or the full size)


@functools.lru_cache(maxsize=None)
def _by_batch_attention(kind, bias_batched):
    """The kernels as custom_partitioning; a bias [1, ...] under a batch of more is replicated."""
    bias = "b p r u" if bias_batched else "a p r u"
    n = 4 + bias_batched
    if kind == "forward":
        return by_batch(_forward, 5, f"{_QKV}, {_MASK}, {bias} -> b t n d, b k t g", n_batched=n)
    return by_batch(_backward, 8, f"{_QKV}, {_MASK}, b t n d, b k t g, b t n d, {bias} -> {_QKV}, b k e f h",
                     n_batched=n + 3)


def _folding_vmap(fn, n_out, n_batched=None):
    """fn(*arrays) with a vmap rule that folds the mapped axis into the batch axis (the first
    n_batched arrays, default all, and every result are [B, ...]): one call, not one per element.
    Where a mapped array is one of the others (e.g. a vmap over models), it maps fn sequentially."""
    @jax.custom_batching.custom_vmap
    def call(*arrays):
        return fn(*arrays)

    @call.def_vmap
    def _rule(axis_size, in_batched, *arrays):
        arrays = [x if b else jnp.broadcast_to(x, (axis_size,) + x.shape) for x, b in zip(arrays, in_batched)]
        if n_batched is not None and any(in_batched[n_batched:]):
            return jax.lax.map(lambda xs: call(*xs), tuple(arrays)), (True,) * n_out
        outs = call(*(x.reshape((-1,) + x.shape[2:]) if i < (n_batched or len(arrays)) else x[0]
                      for i, x in enumerate(arrays)))
        return tuple(o.reshape((axis_size, -1) + o.shape[1:]) for o in outs), (True,) * n_out

    return call


@functools.lru_cache(maxsize=None)
def _call(kind, statics, bias_batched):
    """The attention kernel call for these static arguments (vmap folds into the batch)."""
    fn, n_out = _by_batch_attention(kind, bias_batched), (2 if kind == "forward" else 4)
    n_batched = (4 if kind == "forward" else 7) + bias_batched
    return _folding_vmap(lambda *arrays: fn(*arrays, *statics), n_out, n_batched=n_batched)


def _mask(q, mask):
    """The kernel's mask operand: [B, N|1, T|1, S|1] bool (an all-True [B, 1, 1, 1] for none)."""
    B = q.shape[0]
    if mask is None:
        return jnp.ones((B, 1, 1, 1), bool)
    return jnp.broadcast_to(jnp.asarray(mask, bool), (B,) + tuple(mask.shape[1:]))


def _bias(q, bias):
    """The kernel's bias operand: float32 [B|1, N|1, T|1, S|1] (zeros [B, 1, 1, 1] for none), and
    whether it leads with the batch (else it is [1, ...] under a larger batch: one copy for all)."""
    B = q.shape[0]
    if bias is None:
        return jnp.zeros((B, 1, 1, 1), jnp.float32), True
    bias = jnp.asarray(bias, jnp.float32)
    return bias, bias.shape[0] == B


def _statics(is_causal, window, scale, block_q, block_k, has_mask, has_bias, bias_grad=False):
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block_q and block_k must be positive; got {block_q}, {block_k}")
    window = None if window is None else (int(window[0]), int(window[1]))
    block_k = -(-int(block_k) // KEY_ALIGN) * KEY_ALIGN
    return (bool(is_causal), window, float(scale), int(block_q), block_k, bool(has_mask), bool(has_bias),
            bool(bias_grad))


def attention_forward(q, k, v, mask=None, bias=None, *, is_causal=False, window=None, scale=1.0,
                      block_q=FORWARD_ROWS, block_k=KEY_BLOCK):
    """(o [B, T, N, D], lse [B, K, T, G]) for q [B, T, N, D], k, v [B, S, K, D]: o the attention
    output (logits q k^T * scale + bias; float32, or bfloat16 when q, k and v all are), lse each
    query row's logsumexp (float32; +inf: no visible key). bfloat16 inputs run on Intel AMX where
    the CPU has it (ZOO_NATIVE_AMX=0: not), as a GPU's flash attention does: exact products with
    float32 accumulation, the probabilities rounded to bfloat16 for p v; otherwise widened to
    float32. Other dtypes are computed in float32. mask: bool [B|1, N|1, T|1, S|1], True =
    attend, or None; bias: float [B|1, N|1, T|1, S|1] or None (4D; jnp broadcasting rules; read
    with their broadcast strides).
    Partitioned over the batch axis under jit over a mesh; vmap folds into the batch axis.
    block_q: query rows (positions x grouped heads) per task; block_k: keys per tile (rounded up
    to a multiple of KEY_ALIGN)."""
    load()
    statics = _statics(is_causal, window, scale, block_q, block_k, mask is not None, bias is not None)
    bias, bias_batched = _bias(q, bias)
    dtype = jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in (q, k, v)) else jnp.float32
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    return _call("forward", statics, bias_batched)(q, k, v, _mask(q, mask), bias)


def attention_backward(q, k, v, o, lse, do, mask=None, bias=None, *, bias_grad=False, is_causal=False,
                       window=None, scale=1.0, block_q=BACKWARD_ROWS, block_k=KEY_BLOCK):
    """(dq, dk, dv, dbias) of attention_forward's o, given its lse and the output's cotangent do;
    dbias (with a bias and bias_grad; else None) in the bias's shape. block_q: query rows per step
    of a (batch, kv head) task. bfloat16 q, k, v, o and do give bfloat16 gradients, their products
    on Intel AMX where the CPU has it (p and ds rounded to bfloat16, float32 accumulation, as a
    GPU's flash attention backward); else everything is float32."""
    load()
    dtype = jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in (q, k, v, o, do)) else jnp.float32
    q, k, v, o, do = (x.astype(dtype) for x in (q, k, v, o, do))
    has_bias = bias is not None
    statics = _statics(is_causal, window, scale, block_q, block_k, mask is not None, has_bias, has_bias and bias_grad)
    shape = None if bias is None else jnp.shape(bias)
    bias, bias_batched = _bias(q, bias)
    dq, dk, dv, db = _call("backward", statics, bias_batched)(q, k, v, _mask(q, mask), o, lse, do, bias)
    if not statics[-1]:
        return dq, dk, dv, None
    B, K, G = db.shape[:3]  # [B, K, G|1, T|1, S|1] -> the bias's [B|1, N|1, T|1, S|1]
    db = db.reshape(B, K * G, *db.shape[3:]) if shape[1] > 1 else db.sum(1)
    return dq, dk, dv, db if shape[0] == B else db.sum(0, keepdims=True)


CHAIN_METHODS = {"auto": 0, "fma": 1, "amx": 2}


def _chain(v0, seeds, rows, W, b, c, keep_history, block_rows, method, gemm_only):
    B, K, V = v0.shape[0], seeds.shape[1], v0.shape[1]
    out = jax.ShapeDtypeStruct((B, K if keep_history else 1, V), jnp.float32)
    call = jax.ffi.ffi_call("zoo_gibbs_chain", out, vmap_method="sequential")
    return call(W, b, c, v0, seeds, rows, keep_history=bool(keep_history), block_rows=np.int64(block_rows),
                method=np.int64(CHAIN_METHODS[method]), gemm_only=bool(gemm_only))


_chain_by_batch = by_batch(_chain, 6, "b v, b k x y, b, v h, v, h -> b o v", n_statics=4, n_batched=3)


@functools.lru_cache(maxsize=None)
def _chain_call(*statics):
    return _folding_vmap(lambda *arrays: (_chain_by_batch(*arrays, *statics),), 1, n_batched=3)


def gibbs_chain(v0, seeds, rows, W, b, c, *, keep_history=False, block_rows=CHAIN_ROWS, method="auto",
                gemm_only=False):
    """A Bernoulli RBM's block-Gibbs chains (float32; see csrc/gibbs.cc) -> [B, K or 1, V].

    v0 [B, V] the start; seeds [B, K, 2, 2] uint32, each chain's two "hash" seeds per sweep and
    half-sweep (h, then v); rows [B] uint32, each chain's row in its draws' [B, n] arrays;
    W [V, H], b [V], c [H]. Every sweep's v with keep_history, else the last. block_rows: chains
    per task. method: "fma" (float32 FMA GEMMs), "amx" (Intel AMX bf16x3 GEMMs: float32 accuracy;
    an error where the CPU or OS lacks AMX) or "auto" (AMX where it is there, else FMA).
    gemm_only: units turn on where their input is >= 0 (no uniforms, biases or exp): the chain's
    GEMMs alone, a ceiling for benchmarks.
    Partitioned over the chains under jit over a mesh; vmap folds into the chains."""
    load()
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    if method not in CHAIN_METHODS:
        raise ValueError(f"method must be one of {tuple(CHAIN_METHODS)}, got {method!r}")
    f32 = jnp.float32
    return _chain_call(bool(keep_history), int(block_rows), method, bool(gemm_only))(
        v0.astype(f32), seeds, rows, W.astype(f32), b.astype(f32), c.astype(f32))[0]
