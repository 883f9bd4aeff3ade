"""cuDNN's flash attention forward called directly (csrc_cuda/cudnn_attention.cc, an XLA FFI custom
call), not through XLA's own cuDNN custom call, which zero-fills the output before every call.

XLA builds each cuDNN attention call (jax.nn.dot_product_attention(implementation="cudnn")) with
`should_memzero` set (xla/service/gpu/thunk_emitter.cc: IsCustomCallTofMHA), so its thunk
memsets every output buffer before the kernel runs: for a forward the whole [B, T, N, D] output.
At B4 N16 T1024 D128 bf16 on an H200 that was a 16 MiB memset and two small ones per ~60 us
kernel, the only difference between JAX's and PyTorch's calls of the same cuDNN kernel (the
lease of 2026-11-27, benchmarks/results/README.md). This module's call runs the same cuDNN graph
(the cuDNN frontend's SDPA node) on XLA's stream with nothing before it.

It is built on first use, like zoo.ops.native: the machine's C++ compiler (CXX, else g++),
against jax.ffi.include_dir() and the headers of CUDA (cuda.h, nvrtc.h), cuDNN (cudnn.h) and the
cuDNN frontend (`pip install nvidia-cudnn-frontend`: header-only C++ in its wheel), found in
CUDA_HOME / ZOO_CUDA_INCLUDE, the nvidia-* Python packages, /usr/local/cuda and /usr/include.
No CUDA library is linked: the frontend's dynamic loading uses the cuDNN and CUDA runtime that
JAX's CUDA plugin has loaded. The library goes to the cache (ZOO_CACHE_DIR, else ~/.cache/zoo),
once per source, compiler, headers and jaxlib. Where anything is missing (no NVIDIA GPU, no
compiler, a header), `available()` is False with the reason in `unavailable_reason()`, and
zoo.ops.attention's auto keeps JAX's cuDNN call. ZOO_CUDNN_DIRECT=0 turns it off; auto takes it
only with ZOO_CUDNN_DIRECT=1 (chosen_by_auto), until a lent GPU has run it through.

Forward only: zoo.ops.attention's "cudnn-direct" differentiates through JAX's own cuDNN call.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import jax
import numpy as np

from zoo.ops import native

SOURCE = Path(__file__).with_name("csrc_cuda") / "cudnn_attention.cc"
TARGET = "zoo_cudnn_attention_forward"
# header -> where it comes from, for the error when it is missing
HEADERS = {"cuda.h": "the CUDA toolkit (CUDA_HOME) or `pip install nvidia-cuda-runtime`",
           "nvrtc.h": "the CUDA toolkit (CUDA_HOME) or `pip install nvidia-cuda-nvrtc`",
           "cudnn.h": "`pip install nvidia-cudnn-cu13` (JAX's CUDA plugin brings it)",
           "cudnn_frontend.h": "`pip install nvidia-cudnn-frontend`"}

# searched by the compiler anyway; naming one with -I reorders the C library's headers and can break
# #include_next in libstdc++'s
SYSTEM_INCLUDES = ("/usr/include", "/usr/local/include")

_state: dict = {}  # "lib" and "version", or "error": why not


class Unavailable(RuntimeError):
    """The direct cuDNN call cannot be built or loaded here (the message says why)."""


def _package_dirs(*parts) -> list[Path]:
    """`parts` under each sys.path entry (the nvidia-* wheels install under site-packages/nvidia)."""
    return [Path(p, *parts) for p in sys.path if p and Path(p, *parts).is_dir()]


def _candidate_dirs() -> list[Path]:
    dirs = [Path(d) for d in os.environ.get("ZOO_CUDA_INCLUDE", "").split(os.pathsep) if d]
    for env in ("CUDA_HOME", "CUDA_PATH", "CUDNN_HOME"):
        if os.environ.get(env):
            dirs.append(Path(os.environ[env]) / "include")
    spec = importlib.util.find_spec("cudnn")  # nvidia-cudnn-frontend: its headers beside the package
    if spec is not None and spec.origin:
        dirs.append(Path(spec.origin).parent.parent / "include")
    for sub in ("cu13", "cu12", "cudnn", "cuda_runtime", "cuda_nvrtc"):
        dirs += _package_dirs("nvidia", sub, "include")
    dirs += [Path("/usr/local/cuda/include"), Path("/usr/include")]
    return dirs


def include_dirs() -> list[str]:
    """Directories holding each header the source needs (Unavailable naming what is missing)."""
    found, missing = [], []
    candidates = _candidate_dirs()
    for header, source in HEADERS.items():
        where = next((d for d in candidates if (d / header).is_file()), None)
        if where is None:
            missing.append(f"{header} (from {source})")
        elif str(where) not in found and str(where) not in SYSTEM_INCLUDES:
            found.append(str(where))
    if missing:
        raise Unavailable("headers not found: " + "; ".join(missing))
    return [jax.ffi.include_dir(), *found]


def _flags(includes) -> list[str]:
    return ["-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-gnu-unique",
            *(f"-I{d}" for d in includes), *native.self_contained(), *os.environ.get("ZOO_CUDNN_CXXFLAGS", "").split()]


def build(cxx: str | None = None) -> Path:
    """The compiled library's path, compiling it first if the cache lacks it (~30 s)."""
    includes = include_dirs()
    cxx, version = native.compiler_version(cxx, Unavailable)
    versions = [Path(d, h).read_text(errors="replace") for d in includes[1:]
                for h in ("cudnn_version.h", "cudnn_frontend_version.h") if Path(d, h).is_file()]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), (SOURCE.parent / "ffi_cuda.h").read_text(), cxx, version, " ".join(_flags(includes)),
                                    *versions, jax.__version__]).encode()).hexdigest()[:16]
    return native.compile_into_cache(cxx, _flags(includes), [SOURCE], native.cache_dir() / f"cudnn-{key}.so",
                                     "the direct cuDNN attention call", Unavailable, libs=("-ldl",))


def _cudnn_library() -> str:
    """libcudnn.so.9's path in the nvidia-cudnn package, for when it is not loaded yet ("" if none)."""
    return next((str(d / "libcudnn.so.9") for d in _package_dirs("nvidia", "cudnn", "lib")
                 if (d / "libcudnn.so.9").is_file()), "")


def _open():
    if os.environ.get("ZOO_CUDNN_DIRECT", "1") == "0":
        raise Unavailable("turned off by ZOO_CUDNN_DIRECT=0")
    lib, _state["version"] = native.open_cuda_call(build, "zoo_cudnn_init", {TARGET: "ZooCudnnAttentionForward"},
                                                   _cudnn_library(), Unavailable)
    return lib


def load():
    """Build (if needed), load and register the call once per process; Unavailable if not."""
    return native.load_once(_state, _open, Unavailable)


def chosen_by_auto() -> str | None:
    """None if zoo.ops.attention's auto may take this call (ZOO_CUDNN_DIRECT=1 and available()),
    else why not. Until a lent GPU has run it, auto leaves it to those who ask: on its first GPU
    run (2026-11-28) it crashed the process (a libstdc++ linked into it, fixed since), and a crash
    in auto's choice would end a user's training. implementation="cudnn-direct" runs it where it
    is available, whatever ZOO_CUDNN_DIRECT says but "0"."""
    if os.environ.get("ZOO_CUDNN_DIRECT", "") != "1":
        return "auto takes it with ZOO_CUDNN_DIRECT=1 (not yet run through on a GPU)"
    return unavailable_reason()


def unavailable_reason() -> str | None:
    return native.why_not(load, _state, Unavailable)


def available() -> bool:
    return unavailable_reason() is None


def _forward(q, k, v, scale, is_causal):
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")
    return call(q, k, v, scale=np.float32(scale), is_causal=bool(is_causal))


# under jit over a mesh, each device attends over its own examples (zoo.ops.native's rule)
_forward_by_batch = native.by_batch(_forward, 3, "b t n d, b s k d, b s k d -> b t n d", n_statics=2)


def attention_forward(q, k, v, *, scale: float, is_causal: bool = False):
    """softmax(q k^T * scale, causal if is_causal) v by cuDNN: q [B, T, N, D], k, v [B, S, K, D]
    (N % K == 0), bfloat16 or float16, D <= 128 and a multiple of 8 -> [B, T, N, D] in q's dtype.
    Causal aligns query i with key i (top-left), as jax.nn does. No gradient (a custom call):
    zoo.ops.attention's "cudnn-direct" gives it JAX's."""
    load()
    return _forward_by_batch(q, k, v, float(scale), bool(is_causal))
