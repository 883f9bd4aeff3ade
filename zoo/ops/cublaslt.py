"""cuBLASLt's matmul with the GELU backward in its epilogue (DGELU_BGRAD), called directly
(csrc_cuda/cublaslt_dgelu.cc, an XLA FFI custom call): `dgelu(g, w, z)` = ((g @ w.T) * GELU'(z),
the column sums of that), the MLP's backward through its GELU in one matmul.

XLA never uses this epilogue: its form of the same is the matmul writing g @ w.T, then a pass
reading that and z to write dz (zoo.ops.matmul_gelu's "xla"): for GPT-124M at B64 that pass moves
1.2 GB per layer, and the epilogue saves 0.8 of it (the product is never written or read back).
cuBLASLt's GELU is GPT-2's tanh approximation. Its bias gradient is written in the output's dtype
(bfloat16 / float16: cuBLASLt's rule for BGRAD epilogues), from float32 sums.

Built on first use like zoo.ops.native, with the machine's C++ compiler (CXX, else g++) and
jax.ffi.include_dir() alone: no CUDA header is needed (the few cuBLASLt declarations it uses are
in csrc_cuda/cublaslt_abi.h), and no CUDA library is linked (it uses the libcublasLt that JAX's
CUDA plugin loaded for XLA's own matmuls, else the nvidia-cublas package's). Where it cannot run
(no NVIDIA GPU, no compiler), `available()` is False with the reason in `unavailable_reason()`.
ZOO_CUBLASLT=0 turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from zoo.ops import _pallas, native

CSRC = Path(__file__).with_name("csrc_cuda")
SOURCE = CSRC / "cublaslt_dgelu.cc"
TARGET = "zoo_cublaslt_dgelu"
DTYPES = (jnp.bfloat16, jnp.float16)

_state: dict = {}  # "lib" and "version", or "error": why not
_compile_only = [False]  # within compiling_without_device


class Unavailable(RuntimeError):
    """The direct cuBLASLt call cannot be built or loaded here (the message says why)."""


def _flags() -> list[str]:
    return ["-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-gnu-unique",
            f"-I{jax.ffi.include_dir()}", f"-I{CSRC}", *os.environ.get("ZOO_CUBLASLT_CXXFLAGS", "").split()]


def build(cxx: str | None = None) -> Path:
    """The compiled library's path, compiling it first if the cache lacks it (a few seconds)."""
    cxx, version = native.compiler_version(cxx, Unavailable)
    texts = [SOURCE.read_text(), *((CSRC / h).read_text() for h in ("cublaslt_abi.h", "ffi_cuda.h"))]
    key = hashlib.sha256("\0".join([*texts, cxx, version, " ".join(_flags()), jax.__version__]).encode()
                         ).hexdigest()[:16]
    return native.compile_into_cache(cxx, _flags(), [SOURCE], native.cache_dir() / f"cublaslt-{key}.so",
                                     "the direct cuBLASLt call", Unavailable, libs=("-ldl",))


def _library_path() -> str:
    """libcublasLt's path in the nvidia-cublas package, for when it is not loaded yet ("" if none)."""
    for p in sys.path:
        for sub, name in (("cu13", "libcublasLt.so.13"), ("cublas", "libcublasLt.so.12")):
            if p and Path(p, "nvidia", sub, "lib", name).is_file():
                return str(Path(p, "nvidia", sub, "lib", name))
    return ""


def _open():
    if os.environ.get("ZOO_CUBLASLT", "1") == "0":
        raise Unavailable("turned off by ZOO_CUBLASLT=0")
    if _compile_only[0]:  # compiling_without_device: registered to compile, never run
        lib = ctypes.CDLL(str(build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.ZooCublasLtDgelu), platform="CUDA")
        return lib
    if not _pallas.on_cuda_gpu():
        raise Unavailable(f"needs an NVIDIA GPU (JAX's default backend is {jax.default_backend()!r})")
    lib, _state["version"] = native.open_cuda_call(build(), "zoo_cublaslt_init", "ZooCublasLtDgelu", TARGET,
                                                   _library_path(), Unavailable)
    return lib


def load():
    """Build (if needed), load and register the call once per process; Unavailable if not."""
    return native.load_once(_state, _open, Unavailable)


def unavailable_reason() -> str | None:
    return native.why_not(load, _state, Unavailable)


def available() -> bool:
    return unavailable_reason() is None


@contextlib.contextmanager
def compiling_without_device():
    """Within it, the call traces as if available: on first use its library is built and
    registered for CUDA, not initialised (nothing runs), for compiling a program for a GPU on a
    machine without one (zoo.bench.hlo.tracing_for_gpu). Where it cannot build, the reason."""
    saved = dict(_state)
    _state.clear()
    _compile_only[0] = True
    try:
        yield
    finally:
        _compile_only[0] = False
        _state.clear()
        _state.update(saved)


def check(g, w, z) -> None:
    """ValueError unless dgelu takes these: g [M, K], w [N, K], z [M, N] of one dtype, bfloat16 or
    float16, N and K multiples of 8 (cuBLASLt's rule for the epilogue's input)."""
    if g.ndim != 2 or w.ndim != 2 or z.ndim != 2 or w.shape[1] != g.shape[1] or z.shape != (g.shape[0], w.shape[0]):
        raise ValueError(f"cuBLASLt DGELU: want g [M, K], w [N, K] and z [M, N], got {g.shape}, {w.shape} and "
                         f"{z.shape}")
    if not (g.dtype == w.dtype == z.dtype) or g.dtype not in DTYPES:
        raise ValueError(f"cuBLASLt DGELU: g, w and z must all be bfloat16 or all float16, got {g.dtype}, {w.dtype} "
                         f"and {z.dtype}")
    if w.shape[0] % 8 or w.shape[1] % 8:
        raise ValueError(f"cuBLASLt DGELU: N and K must be multiples of 8, got w {w.shape}")


def _call(g, w, z):
    call = jax.ffi.ffi_call(TARGET, (jax.ShapeDtypeStruct(z.shape, z.dtype), jax.ShapeDtypeStruct(z.shape[1:], z.dtype)),
                            vmap_method="sequential")
    return call(g, w, z)


def dgelu(g, w, z):
    """(dz, dbias) = ((g @ w.T) * GELU'(z), dz's column sums) by one cuBLASLt matmul: g [M, K],
    w [N, K], z [M, N], one dtype (bfloat16 / float16) -> dz [M, N] and dbias [N], both in that
    dtype (see `check`). Not differentiable (it is itself a backward); one device's rows (see
    zoo.ops.matmul_gelu for the sharded form)."""
    check(g, w, z)
    load()
    return _call(g, w, z)
