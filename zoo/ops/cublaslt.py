"""cuBLASLt's matmuls with backward epilogues, called directly (csrc_cuda/cublaslt.cc, XLA FFI
custom calls); XLA never emits these epilogues (its cuBLASLt rewriter knows only the forward ones):

- `dgelu(g, w, z)` = ((g @ w.T) * GELU'(z), the column sums of that): the MLP's backward through
  its GELU in one matmul (DGELU_BGRAD). XLA's form is the matmul writing g @ w.T, then a pass
  reading that and z to write dz (zoo.ops.matmul_gelu's "xla"): for GPT-124M at B64 that pass
  moves 1.2 GB per layer, and the epilogue saves 0.8 of it (the product is never written or read
  back). cuBLASLt's GELU is GPT-2's tanh approximation.
- `wgrad(x, dy)` = (x.T @ dy, the column sums of dy): a dense layer's weight and bias gradients
  in one matmul (BGRADB: the epilogue sums dy as the matmul reads it). XLA's form reads dy in a
  pass of its own for the bias gradient: for each of GPT-124M's q, k and v projections at B64,
  0.1 GB per layer (3.7 GB per step).

Their bias gradients are written in the output's dtype (bfloat16 / float16: cuBLASLt's rule for
BGRAD epilogues), from float32 sums.

Built on first use like zoo.ops.native, with the machine's C++ compiler (CXX, else g++) and
jax.ffi.include_dir() alone: no CUDA header is needed (the few cuBLASLt declarations it uses are
in csrc_cuda/cublaslt_abi.h), and no CUDA library is linked (it uses the libcublasLt that JAX's
CUDA plugin loaded for XLA's own matmuls, else the nvidia-cublas package's). Where it cannot run
(no NVIDIA GPU, no compiler), `available()` is False with the reason in `unavailable_reason()`.
ZOO_CUBLASLT=0 turns both calls off, ZOO_CUBLASLT_WGRAD=0 the weight-gradient one alone;
ZOO_CUBLASLT_DGELU_W and ZOO_CUBLASLT_WGRAD_EPILOGUE pick between two mappings of each (both
checked on the host; which cuBLASLt runs faster, or at all, is for a GPU to say:
benchmarks/scripts/cublaslt_check.py).
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
import numpy as np

from zoo.ops import native

CSRC = Path(__file__).with_name("csrc_cuda")
SOURCE = CSRC / "cublaslt.cc"
TARGET = "zoo_cublaslt_dgelu"
WGRAD_TARGET = "zoo_cublaslt_wgrad"
HANDLERS = {TARGET: "ZooCublasLtDgelu", WGRAD_TARGET: "ZooCublasLtWgrad"}  # FFI target -> the library's symbol
DTYPES = (jnp.bfloat16, jnp.float16)

_state: dict = {}  # "lib" and "version", or "error": why not
_compile_only = [False]  # within compiling_without_device


class Unavailable(RuntimeError):
    """The direct cuBLASLt call cannot be built or loaded here (the message says why)."""


def _flags() -> list[str]:
    return ["-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-gnu-unique",
            f"-I{jax.ffi.include_dir()}", f"-I{CSRC}", *native.self_contained(),
            *os.environ.get("ZOO_CUBLASLT_CXXFLAGS", "").split()]


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
        native.register_cuda(lib, HANDLERS)
        return lib
    lib, _state["version"] = native.open_cuda_call(build, "zoo_cublaslt_init", HANDLERS, _library_path(),
                                                   Unavailable)
    return lib


def load():
    """Build (if needed), load and register the call once per process; Unavailable if not."""
    return native.load_once(_state, _open, Unavailable)


def unavailable_reason() -> str | None:
    return native.why_not(load, _state, Unavailable)


def available() -> bool:
    return unavailable_reason() is None


def wgrad_unavailable_reason() -> str | None:
    """Why `wgrad` cannot run here (None if it can): as `unavailable_reason`, or turned off alone
    by ZOO_CUBLASLT_WGRAD=0 (benchmarks/device.sh, where its check fails and DGELU's passes)."""
    if os.environ.get("ZOO_CUBLASLT_WGRAD", "1") == "0":
        return "turned off by ZOO_CUBLASLT_WGRAD=0"
    return unavailable_reason()


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


# how dgelu hands w to cuBLASLt: "kn" (the default) transposed by XLA first, [K, N], read as it is
# (op(A) N: TransformerEngine's form of this matmul, its weight [out, in], so the form known to
# run; in a GPT step the transpose folds into the kernel's cast to bf16, no launch of its own;
# alone, a [K, N] copy, 4.7 MB for GPT-124M's proj), or "nk" as it is, [N, K], read transposed
# (op(A) T); ZOO_CUBLASLT_DGELU_W picks (benchmarks/scripts/cublaslt_check.py checks and times
# both)
DGELU_W_LAYOUTS = {"nk": 0, "kn": 1}


def _env_choice(env: str, options, default: str) -> str:
    """The option the environment variable `env` names (default if unset), or a ValueError."""
    name = os.environ.get(env, default)
    if name not in options:
        raise ValueError(f"{env} must be one of {', '.join(options)}; got {name!r}")
    return name


def dgelu_w_layout() -> str:
    return _env_choice("ZOO_CUBLASLT_DGELU_W", DGELU_W_LAYOUTS, "kn")


def _call(g, w, z, w_layout):
    call = jax.ffi.ffi_call(TARGET, (jax.ShapeDtypeStruct(z.shape, z.dtype), jax.ShapeDtypeStruct(z.shape[1:], z.dtype)),
                            vmap_method="sequential")
    return call(g, w, z, w_kn=np.int32(DGELU_W_LAYOUTS[w_layout]))


def dgelu(g, w, z):
    """(dz, dbias) = ((g @ w.T) * GELU'(z), dz's column sums) by one cuBLASLt matmul: g [M, K],
    w [N, K], z [M, N], one dtype (bfloat16 / float16) -> dz [M, N] and dbias [N], both in that
    dtype (see `check`; w handed over as dgelu_w_layout() says). Not differentiable (it is itself
    a backward); one device's rows (see zoo.ops.matmul_gelu for the sharded form)."""
    check(g, w, z)
    load()
    w_layout = dgelu_w_layout()
    return _call(g, w.T if w_layout == "kn" else w, z, w_layout)


def check_wgrad(x, dy) -> None:
    """ValueError unless wgrad takes these: x [M, I], dy [M, F] of one dtype, bfloat16 or float16,
    I and F multiples of 8 (16-byte rows, as cuBLASLt's tensor-core matmuls want)."""
    if x.ndim != 2 or dy.ndim != 2 or x.shape[0] != dy.shape[0]:
        raise ValueError(f"cuBLASLt weight gradient: want x [M, I] and dy [M, F], got {x.shape} and {dy.shape}")
    if x.dtype != dy.dtype or x.dtype not in DTYPES:
        raise ValueError(f"cuBLASLt weight gradient: x and dy must both be bfloat16 or both float16, got {x.dtype} and "
                         f"{dy.dtype}")
    if x.shape[1] % 8 or dy.shape[1] % 8:
        raise ValueError(f"cuBLASLt weight gradient: I and F must be multiples of 8, got x {x.shape} and dy {dy.shape}")


# cuBLASLt's epilogue for wgrad: "bgradb" (TransformerEngine's mapping, the weight gradient
# written transposed and transposed back by XLA) or "bgrada" (written as Flax keeps the kernel);
# ZOO_CUBLASLT_WGRAD_EPILOGUE picks (benchmarks/scripts/cublaslt_check.py checks and times both)
WGRAD_EPILOGUES = {"bgradb": 512, "bgrada": 256}


def wgrad_epilogue() -> str:
    return _env_choice("ZOO_CUBLASLT_WGRAD_EPILOGUE", WGRAD_EPILOGUES, "bgradb")


def _wgrad_call(x, dy, epilogue: str):
    """(dw [I, F] for "bgrada", its transpose [F, I] for "bgradb"; db [F]): the FFI call's layout."""
    F, I = dy.shape[1], x.shape[1]
    shape = (F, I) if epilogue == "bgradb" else (I, F)
    call = jax.ffi.ffi_call(WGRAD_TARGET, (jax.ShapeDtypeStruct(shape, x.dtype), jax.ShapeDtypeStruct((F,), x.dtype)),
                            vmap_method="sequential")
    return call(x, dy, epilogue=np.int32(WGRAD_EPILOGUES[epilogue]))


def wgrad(x, dy, epilogue: str | None = None):
    """(dw, db) = (x.T @ dy, dy's column sums) by one cuBLASLt matmul: x [M, I], dy [M, F] of one
    dtype (bfloat16 / float16) -> dw [I, F] and db [F], both in that dtype (see `check_wgrad`).
    epilogue (WGRAD_EPILOGUES, default wgrad_epilogue()): "bgradb" writes dw transposed, [F, I]
    (TransformerEngine's mapping), transposed back here (XLA copies it where it is read);
    "bgrada" writes it as it is. One device's rows; not differentiable."""
    epilogue = epilogue or wgrad_epilogue()
    if epilogue not in WGRAD_EPILOGUES:
        raise ValueError(f"wgrad: epilogue must be one of {', '.join(WGRAD_EPILOGUES)}; got {epilogue!r}")
    check_wgrad(x, dy)
    load()
    dw, db = _wgrad_call(x, dy, epilogue)
    return (dw.T if epilogue == "bgradb" else dw), db
