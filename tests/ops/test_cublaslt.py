"""zoo.ops.cublaslt, cuBLASLt's matmuls with backward epilogues, called directly: the MLP's GELU
backward (DGELU_BGRAD) and a dense layer's weight and bias gradients (BGRADB).

Without a GPU: the ABI it writes out against CUDA's headers (where found); the library builds
from jax.ffi's headers alone and says why when there is no cuBLASLt; its row-major-to-cuBLASLt
mappings driven against a stand-in cuBLASLt (tests/ops/fake_cublaslt.cc, written from cuBLASLt's
documented column-major semantics) and checked with NumPy float64; the wiring of
matmul_gelu_grad / gelu_proj / GPT's gelu_grad="cublaslt", and of zoo.ops.linear.dense / GPT's
qkv_grad="cublaslt", with the FFI calls replaced by stand-ins, against the "xla" forms, on one
device and on 8; clear errors; and (with JAX's CUDA plugin, no GPU) the GPT step compiled for an
H200 with one call per layer (per projection). On a GPU: the calls against float64."""

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tests.bench.test_hlo import CUDA_PLUGIN
from tests.ops.test_matmul_gelu import _inputs, _numpy
from zoo.errors import UnavailableError
from zoo.ops import cublaslt, native
from zoo.ops.gelu import gelu_proj
from zoo.ops.linear import dense
from zoo.ops.matmul_gelu import matmul_gelu_grad

HERE = Path(__file__).parent


def _cuda_include_dirs() -> list[str]:
    """Directories holding cublasLt.h and cuda_fp16.h (CUDA's), or [] where there are none."""
    dirs = [d for d in os.environ.get("ZOO_CUDA_INCLUDE", "").split(os.pathsep) if d]
    dirs += [str(Path(os.environ[e]) / "include") for e in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(e)]
    dirs += [str(Path(p, "nvidia", sub, "include")) for p in sys.path if p for sub in ("cu13", "cublas", "cuda_runtime")]
    dirs += ["/usr/local/cuda/include"]
    found = [next((d for d in dirs if Path(d, h).is_file()), None) for h in ("cublasLt.h", "cuda_fp16.h")]
    return [] if None in found else list(dict.fromkeys(found))


@pytest.mark.skipif(not _cuda_include_dirs(), reason="needs cublasLt.h and CUDA's headers (ZOO_CUDA_INCLUDE)")
def test_the_abi_written_out_matches_cudas_headers(tmp_path):
    """csrc_cuda/cublaslt_abi.h's values and struct layout are cublasLt.h's."""
    src = tmp_path / "abi.cc"
    src.write_text("""#include <cublasLt.h>
#include <cstddef>
#include "cublaslt_abi.h"
namespace z = zoo_lt;
static_assert(z::CUDA_R_32F == CUDA_R_32F && z::CUDA_R_16F == CUDA_R_16F && z::CUDA_R_16BF == CUDA_R_16BF);
static_assert(z::COMPUTE_32F == CUBLAS_COMPUTE_32F && z::OP_N == CUBLAS_OP_N && z::OP_T == CUBLAS_OP_T);
static_assert(z::DESC_TRANSA == CUBLASLT_MATMUL_DESC_TRANSA && z::DESC_TRANSB == CUBLASLT_MATMUL_DESC_TRANSB);
static_assert(z::DESC_EPILOGUE == CUBLASLT_MATMUL_DESC_EPILOGUE);
static_assert(z::DESC_BIAS_POINTER == CUBLASLT_MATMUL_DESC_BIAS_POINTER);
static_assert(z::DESC_AUX_POINTER == CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER);
static_assert(z::DESC_AUX_LD == CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD);
static_assert(z::EPILOGUE_DGELU_BGRAD == CUBLASLT_EPILOGUE_DGELU_BGRAD);
static_assert(z::EPILOGUE_BGRADB == CUBLASLT_EPILOGUE_BGRADB);
static_assert(z::PREF_MAX_WORKSPACE_BYTES == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES);
static_assert(sizeof(z::HeuristicResult) == sizeof(cublasLtMatmulHeuristicResult_t));
static_assert(offsetof(z::HeuristicResult, workspaceSize) == offsetof(cublasLtMatmulHeuristicResult_t, workspaceSize));
static_assert(offsetof(z::HeuristicResult, state) == offsetof(cublasLtMatmulHeuristicResult_t, state));
static_assert(sizeof(z::Algo) == sizeof(cublasLtMatmulAlgo_t) && sizeof(z::Status) == sizeof(cublasStatus_t));
int main() { return 0; }
""")
    cxx, _ = native.compiler_version(None, RuntimeError)
    r = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", *(f"-I{d}" for d in _cuda_include_dirs()),
                        f"-I{cublaslt.CSRC}", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A fresh copy of the library (its own cache directory: its own cuBLASLt, loaded or not)."""
    def build():
        os.environ["ZOO_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
        try:
            return ctypes.CDLL(str(cublaslt.build()))
        except cublaslt.Unavailable as e:
            pytest.skip(str(e))
        finally:
            del os.environ["ZOO_CACHE_DIR"]
    return build


@pytest.fixture(scope="module")
def fake_cublaslt(tmp_path_factory):
    out = tmp_path_factory.mktemp("fake") / "libfake_cublaslt.so"
    cxx, _ = native.compiler_version(None, RuntimeError)
    r = subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", str(HERE / "fake_cublaslt.cc"), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _real_cublaslt_loaded() -> bool:
    try:
        ctypes.CDLL("libcublasLt.so.13", mode=os.RTLD_NOLOAD)
        return True
    except OSError:
        return False


def _init(lib, path: str):
    error = ctypes.create_string_buffer(512)
    lib.zoo_cublaslt_init.restype = ctypes.c_int64
    return lib.zoo_cublaslt_init(path.encode(), error, ctypes.c_int64(len(error))), error.value.decode()


def test_builds_without_cuda_and_says_when_there_is_no_cublaslt(library):
    """No CUDA header or library at build time; the handler and init are exported; init with no
    cuBLASLt loaded and none at the path given names what it looked for."""
    lib = library()
    assert all(hasattr(lib, name) for name in (*cublaslt.HANDLERS.values(), "zoo_cublaslt_dgelu_host",
                                               "zoo_cublaslt_wgrad_host"))
    if _real_cublaslt_loaded():
        pytest.skip("a cuBLASLt is loaded in this process")
    version, error = _init(lib, "/nonexistent/libcublasLt.so.13")
    assert version == 0 and "cannot load cuBLASLt (libcublasLt.so.13 or libcublasLt.so.12): " in error, error


def _host_call(lib, g, w, z, w_layout="nk", dtype=14):
    """zoo_cublaslt_dgelu_host on bf16 host arrays (w [N, K], handed over as `w_layout` says):
    (ok, dz, dbias, error)."""
    g, w, z = (np.ascontiguousarray(a, dtype=ml_dtypes.bfloat16) for a in (g, w, z))
    (M, K), N = g.shape, w.shape[0]
    w = np.ascontiguousarray(w.T) if w_layout == "kn" else w
    dz, db = np.zeros((M, N), ml_dtypes.bfloat16), np.zeros(N, ml_dtypes.bfloat16)
    error = ctypes.create_string_buffer(512)
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    lib.zoo_cublaslt_dgelu_host.restype = ctypes.c_int64
    ok = lib.zoo_cublaslt_dgelu_host(*(ctypes.c_int64(v) for v in (dtype, cublaslt.DGELU_W_LAYOUTS[w_layout], M, N, K)),
                                     p(g), p(w), p(z), p(dz), p(db), error, ctypes.c_int64(len(error)))
    return ok, dz, db, error.value.decode()


@pytest.mark.parametrize("w_layout", ["nk", "kn"])
def test_the_row_major_mapping_against_a_stand_in_cublaslt(library, fake_cublaslt, w_layout):
    """Row-major g [M, K], w [N, K] (or [K, N]: w_layout "kn"), z [M, N] handed to cuBLASLt as the
    column-major operands of D = dz^T with the DGELU_BGRAD epilogue: dz and the column sums as
    NumPy float64 computes them (GELU' by central differences), through a stand-in that computes
    what cuBLASLt's documentation says (and refuses mismatched layouts, a bad aux leading
    dimension, a missing workspace). Then: the plan is reused for new pointers; a dtype it
    refuses, and N % 8 != 0, are errors."""
    lib = library()
    version, error = _init(lib, str(fake_cublaslt))
    if version == 0 or _real_cublaslt_loaded():
        pytest.skip(f"the stand-in did not load: {error or 'a real cuBLASLt is loaded'}")
    assert version == 130802
    for seed, (M, K, N) in enumerate([(24, 40, 16), (24, 40, 16), (7, 8, 32)]):
        g, w, z = (np.asarray(a, np.float32) for a in _inputs(jnp.bfloat16, M=M, K=K, N=N, seed=seed))
        ok, dz, db, error = _host_call(lib, g, w, z, w_layout)
        assert ok == 1, error
        want_dz, want_db = _numpy(g, w, z)
        dz = np.asarray(dz, np.float64)
        np.testing.assert_allclose(dz, want_dz, rtol=2.0**-8, atol=1e-3)
        np.testing.assert_allclose(np.asarray(db, np.float64), want_db, rtol=2.0**-7, atol=1e-2)
    ok, *_, error = _host_call(lib, g, w[:12], z[:, :12], w_layout)
    assert ok == 0 and "multiples of 8" in error, error
    ok, *_, error = _host_call(lib, g, w, z, w_layout, dtype=2)  # float16: the stand-in has no such kernel
    assert ok == 0 and "cuBLASLt heuristic: the stand-in refused" in error, error


def _host_wgrad(lib, x, dy, epilogue, dtype=14):
    """zoo_cublaslt_wgrad_host on bf16 host arrays: (ok, dw [I, F], db [F], error), dw as the call
    writes it for `epilogue` ("bgradb": transposed) turned [I, F]."""
    x, dy = (np.ascontiguousarray(a, dtype=ml_dtypes.bfloat16) for a in (x, dy))
    (M, I), F = x.shape, dy.shape[1]
    dw, db = np.zeros((F, I) if epilogue == "bgradb" else (I, F), ml_dtypes.bfloat16), np.zeros(F, ml_dtypes.bfloat16)
    error = ctypes.create_string_buffer(512)
    p = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    lib.zoo_cublaslt_wgrad_host.restype = ctypes.c_int64
    ok = lib.zoo_cublaslt_wgrad_host(*(ctypes.c_int64(v) for v in (dtype, cublaslt.WGRAD_EPILOGUES[epilogue], M, I, F)),
                                     p(x), p(dy), p(dw), p(db), error, ctypes.c_int64(len(error)))
    return ok, (dw.T if epilogue == "bgradb" else dw), db, error.value.decode()


@pytest.mark.parametrize("epilogue", ["bgradb", "bgrada"])
def test_the_weight_gradient_mapping_against_a_stand_in_cublaslt(library, fake_cublaslt, epilogue):
    """Row-major x [M, I] and dy [M, F] handed to cuBLASLt as D = x^T dy (BGRADB: column-major
    I x F, its memory dw transposed) or D = dy^T x (BGRADA: column-major F x I, its memory dw):
    dw and dy's column sums as NumPy float64 computes them, through the stand-in (which sums
    op(B)'s columns, or op(A)'s rows, over k, as cuBLASLt's documentation says those epilogues
    do). Odd M; the plan reused; I % 8 != 0 and an unknown epilogue are errors."""
    lib = library()
    version, error = _init(lib, str(fake_cublaslt))
    if version == 0 or _real_cublaslt_loaded():
        pytest.skip(f"the stand-in did not load: {error or 'a real cuBLASLt is loaded'}")
    rng = np.random.default_rng(5)
    for M, I, F in [(24, 40, 16), (24, 40, 16), (7, 8, 32)]:
        x, dy = (np.asarray(rng.standard_normal(s), ml_dtypes.bfloat16).astype(np.float64) for s in ((M, I), (M, F)))
        ok, dw, db, error = _host_wgrad(lib, x, dy, epilogue)
        assert ok == 1, error
        np.testing.assert_allclose(np.asarray(dw, np.float64), x.T @ dy, rtol=2.0**-8, atol=1e-3)
        np.testing.assert_allclose(np.asarray(db, np.float64), dy.sum(0), rtol=2.0**-8, atol=1e-3)
    ok, *_, error = _host_wgrad(lib, x[:, :6], dy, epilogue)
    assert ok == 0 and "I and F must be multiples of 8" in error, error
    monkey = dict(cublaslt.WGRAD_EPILOGUES)
    try:
        cublaslt.WGRAD_EPILOGUES[epilogue] = 208
        ok, *_, error = _host_wgrad(lib, x, dy, epilogue)
    finally:
        cublaslt.WGRAD_EPILOGUES.update(monkey)
    assert ok == 0 and "epilogue must be BGRADB (512) or BGRADA (256), got 208" in error, error


def _stand_in(calls):
    """The FFI call replaced by what cuBLASLt computes: float32 product and GELU', dz and its
    column sums rounded to the input dtype."""
    from zoo.ops.matmul_gelu import gelu_tanh_grad

    def call(g, w, z, w_layout):
        calls.append(g.shape)
        w = w.T if w_layout == "kn" else w
        dz = jnp.dot(g.astype(jnp.float32), w.astype(jnp.float32).T) * gelu_tanh_grad(z)
        return dz.astype(z.dtype), jnp.sum(dz, axis=0).astype(z.dtype)
    return call


def _wgrad_stand_in(calls):
    """The weight-gradient call replaced by what cuBLASLt computes: float32 sums, rounded to the
    input dtype, dw written transposed for "bgradb"."""
    def call(x, dy, epilogue):
        calls.append(("wgrad", x.shape, dy.shape))
        dw = jnp.dot(x.astype(jnp.float32).T, dy.astype(jnp.float32))
        return (dw.T if epilogue == "bgradb" else dw).astype(x.dtype), jnp.sum(dy.astype(jnp.float32), 0).astype(x.dtype)
    return call


@pytest.fixture
def stood_in(monkeypatch):
    calls = []
    monkeypatch.setattr(cublaslt, "_call", _stand_in(calls))
    monkeypatch.setattr(cublaslt, "_wgrad_call", _wgrad_stand_in(calls))
    monkeypatch.setattr(cublaslt, "load", lambda: None)
    monkeypatch.setattr(cublaslt, "available", lambda: True)
    return calls


@pytest.mark.parametrize("w_layout", ["nk", "kn"])
def test_matmul_gelu_grad_by_cublaslt_equals_the_xla_form(stood_in, monkeypatch, w_layout):
    monkeypatch.setenv("ZOO_CUBLASLT_DGELU_W", w_layout)
    g, w, z = _inputs(jnp.bfloat16, M=64, K=32, N=48)
    dz, db = matmul_gelu_grad(g, w, z, implementation="cublaslt")
    want_dz, want_db = matmul_gelu_grad(g, w, z, implementation="xla")
    assert set(stood_in) == {(64, 32)} and dz.dtype == jnp.bfloat16 and db.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dz, np.float32), np.asarray(want_dz, np.float32), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(db), np.asarray(want_db), rtol=2e-2, atol=5e-2)
    # w and g are taken in z's dtype
    dz32, _ = matmul_gelu_grad(g.astype(jnp.float32), w.astype(jnp.float32), z, implementation="cublaslt")
    np.testing.assert_array_equal(np.asarray(dz32, np.float32), np.asarray(dz, np.float32))


def test_gpt_gradients_with_gelu_grad_cublaslt_equal_xla(stood_in):
    """A bf16 GPT with gelu_grad="cublaslt" (the call stood in): one call per layer's backward,
    and the loss and every gradient as gelu_grad="xla"'s (to bf16's rounding)."""
    import dataclasses

    from zoo.errors import ConfigError
    from zoo.models.gpt import GPTConfig, make_gpt

    cfg = GPTConfig(vocab_size=32, max_len=8, num_layers=2, hidden=16, num_heads=2, dtype="bfloat16",
                    gelu="epilogue")
    batch = {"x": jnp.asarray(np.random.default_rng(6).integers(0, 32, (2, 9)), jnp.int32),
             "idx": jnp.arange(2, dtype=jnp.int32)}
    params = make_gpt(cfg).init(jax.random.key(0), batch)
    out = {}
    for impl in ("xla", "cublaslt"):
        md = make_gpt(dataclasses.replace(cfg, gelu_grad=impl))
        out[impl] = jax.jit(jax.value_and_grad(lambda p, md=md: md.loss(p, jax.random.key(1), batch)[0]))(params)
    assert set(stood_in) == {(16, 16)}  # the layers' backward: B*T rows by the hidden width
    np.testing.assert_allclose(float(out["cublaslt"][0]), float(out["xla"][0]), rtol=1e-6)
    for a, c in zip(jax.tree.leaves(out["cublaslt"][1]), jax.tree.leaves(out["xla"][1])):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(c, np.float32), rtol=3e-2, atol=3e-3)
    with pytest.raises(ConfigError, match="model.gelu_grad=cublaslt needs model.gelu=epilogue"):
        GPTConfig(gelu_grad="cublaslt")
    with pytest.raises(ConfigError, match="needs a bfloat16 or float16 model.dtype"):
        GPTConfig(gelu_grad="cublaslt", gelu="epilogue")
    with pytest.raises(ValueError, match='"cublaslt" takes bfloat16 or float16 inputs, got float32'):
        gelu_proj(jnp.zeros((4, 16)), jnp.zeros(16), jnp.zeros((16, 8)), "cublaslt")


def test_on_eight_devices_each_shard_calls_on_its_rows(stood_in):
    """Rows of g and z sharded over 8 devices: the call runs per shard (8 rows each), the column
    sums summed across shards in float32; values as on one device."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    if len(jax.devices()) < 8:
        pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    g, w, z = _inputs(jnp.bfloat16, M=64, K=32, N=48, seed=4)
    f = lambda g, w, z: matmul_gelu_grad(g, w, z, implementation="cublaslt")  # noqa: E731
    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    got = jax.jit(f, in_shardings=(rows, rep, rows))(g, w, z)
    assert (8, 32) in stood_in
    want = jax.jit(f)(g, w, z)
    np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("epilogue", ["bgradb", "bgrada"])
def test_dense_with_cublaslt_weight_gradients_equals_xla(stood_in, monkeypatch, epilogue):
    """dense(weight_grad="cublaslt") (the call stood in, either epilogue): the same output as
    "xla", and x's, w's and the bias's gradients within bf16's rounding (w and bias float32, as
    params are)."""
    monkeypatch.setenv("ZOO_CUBLASLT_WGRAD_EPILOGUE", epilogue)
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((4, 6, 32)), jnp.bfloat16)
    w, b = jnp.asarray(rng.standard_normal((32, 24)) * 0.2, jnp.float32), jnp.asarray(rng.standard_normal(24), jnp.float32)
    t = jnp.asarray(rng.standard_normal((4, 6, 24)), jnp.float32)
    out = {}
    for impl in ("xla", "cublaslt"):
        f = lambda x, w, b, impl=impl: jnp.sum(dense(x, w, b, weight_grad=impl).astype(jnp.float32) * t)  # noqa: E731
        out[impl] = (dense(x, w, b, weight_grad=impl), jax.grad(f, argnums=(0, 1, 2))(x, w, b))
    assert set(stood_in) == {("wgrad", (24, 32), (24, 24))}
    np.testing.assert_array_equal(np.asarray(out["cublaslt"][0], np.float32), np.asarray(out["xla"][0], np.float32))
    for a, c in zip(out["cublaslt"][1], out["xla"][1]):
        assert a.dtype == c.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(c, np.float32), rtol=1e-2, atol=2e-2)
    # against NumPy float64 from the same bf16 values
    x64, t64 = np.asarray(x, np.float64).reshape(24, 32), np.asarray(t, np.float64).reshape(24, 24)
    np.testing.assert_allclose(np.asarray(out["cublaslt"][1][1]), x64.T @ t64, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(out["cublaslt"][1][2]), t64.sum(0), rtol=2e-2, atol=2e-2)


def test_gpt_gradients_with_qkv_grad_cublaslt_equal_xla(stood_in):
    """A bf16 GPT with qkv "separate" and qkv_grad="cublaslt" (the call stood in), with the XLA
    layer norm and the Pallas one (its three copies of the input): the loss and every gradient as
    qkv_grad="xla"'s (to bf16's rounding)."""
    import dataclasses

    from zoo.errors import ConfigError
    from zoo.models.gpt import GPTConfig, make_gpt

    batch = {"x": jnp.asarray(np.random.default_rng(8).integers(0, 32, (2, 9)), jnp.int32),
             "idx": jnp.arange(2, dtype=jnp.int32)}
    for layer_norm in ("xla", "pallas"):
        cfg = GPTConfig(vocab_size=32, max_len=8, num_layers=2, hidden=16, num_heads=2, dtype="bfloat16",
                        qkv="separate", layer_norm=layer_norm)
        params = make_gpt(cfg).init(jax.random.key(0), batch)
        out = {}
        for impl in ("xla", "cublaslt"):
            stood_in.clear()
            md = make_gpt(dataclasses.replace(cfg, qkv_grad=impl))
            out[impl] = jax.jit(jax.value_and_grad(lambda p, md=md: md.loss(p, jax.random.key(1), batch)[0]))(params)
        assert set(stood_in) == {("wgrad", (16, 16), (16, 16))}  # B*T rows, the hidden width in and out
        np.testing.assert_allclose(float(out["cublaslt"][0]), float(out["xla"][0]), rtol=1e-6)
        for a, c in zip(jax.tree.leaves(out["cublaslt"][1]), jax.tree.leaves(out["xla"][1])):
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(c, np.float32), rtol=3e-2, atol=3e-3)
    for bad, match in [(dict(qkv_grad="cublas"), "model.qkv_grad 'cublas'; valid: cublaslt, xla"),
                       (dict(qkv_grad="cublaslt", dtype="bfloat16"), "needs model.qkv=separate"),
                       (dict(qkv_grad="cublaslt", qkv="separate"), "dtype=float32"),
                       (dict(qkv_grad="cublaslt", qkv="separate", dtype="bfloat16", finetune="lora"), "finetune=lora")]:
        with pytest.raises(ConfigError, match=match):
            GPTConfig(**bad)


def test_dense_on_eight_devices_each_shard_calls_on_its_rows(stood_in):
    """x's rows sharded over 8 devices: the weight-gradient call runs per shard (8 rows each), the
    gradients summed across shards in float32; values as on one device, to the shards' bf16
    rounding."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    if len(jax.devices()) < 8:
        pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
    w, b = jnp.asarray(rng.standard_normal((32, 16)) * 0.2, jnp.float32), jnp.zeros(16, jnp.float32)
    f = jax.grad(lambda x, w, b: jnp.sum(dense(x, w, b, weight_grad="cublaslt").astype(jnp.float32) ** 2),
                 argnums=(0, 1, 2))
    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    got = jax.jit(f, in_shardings=(rows, rep, rep))(x, w, b)
    assert ("wgrad", (8, 32), (8, 16)) in stood_in
    want = jax.jit(f)(x, w, b)
    for a, c in zip(got, want):  # each shard's sums rounded to bf16 (2^-9 relative) before the sum
        c = np.asarray(c, np.float32)
        np.testing.assert_allclose(np.asarray(a, np.float32), c, rtol=1e-2, atol=8 * 2.0**-9 * np.abs(c).max())


def test_errors_are_clear():
    g, w, z = _inputs(jnp.float32)
    with pytest.raises(ValueError, match="must all be bfloat16 or all float16, got float32"):
        matmul_gelu_grad(g, w, z, implementation="cublaslt")
    gb, wb, zb = _inputs(jnp.bfloat16, N=44)
    with pytest.raises(ValueError, match=r"N and K must be multiples of 8, got w \(44, 32\)"):
        matmul_gelu_grad(gb, wb, zb, implementation="cublaslt")
    if jax.default_backend() != "gpu":
        gb, wb, zb = _inputs(jnp.bfloat16)
        with pytest.raises(UnavailableError, match='"cublaslt" is not available here: needs an NVIDIA GPU'):
            matmul_gelu_grad(gb, wb, zb, implementation="cublaslt")
        with pytest.raises(UnavailableError, match="needs an NVIDIA GPU"):
            gelu_proj(zb, jnp.zeros(48, jnp.float32), wb.T, "cublaslt")
        with pytest.raises(UnavailableError, match='dense: weight_grad "cublaslt" is not available here: needs an'):
            dense(jnp.zeros((4, 16), jnp.bfloat16), jnp.zeros((16, 8)), jnp.zeros(8), weight_grad="cublaslt")
    with pytest.raises(ValueError, match='weight_grad "cublaslt" takes a bfloat16 or float16 x, got float32'):
        dense(jnp.zeros((4, 16)), jnp.zeros((16, 8)), jnp.zeros(8), weight_grad="cublaslt")
    with pytest.raises(ValueError, match=r"I and F must be multiples of 8, got x \(4, 12\) and dy \(4, 8\)"):
        dense(jnp.zeros((4, 12), jnp.bfloat16), jnp.zeros((12, 8)), jnp.zeros(8), weight_grad="cublaslt")
    with pytest.raises(ValueError, match="weight_grad must be one of xla, cublaslt; got 'cublas'"):
        dense(jnp.zeros((4, 16)), jnp.zeros((16, 8)), jnp.zeros(8), weight_grad="cublas")
    from zoo.nn.transformer import Attention, LoRADense

    x16 = jnp.zeros((2, 4, 16), jnp.bfloat16)
    for layer, match in [(LoRADense(8, weight_grad="cublas"), "LoRADense.weight_grad must be one of xla, cublaslt"),
                         (LoRADense(8, weight_grad="cublaslt", gelu="tanh"), "needs a plain layer: a bias, no LoRA"),
                         (LoRADense(8, weight_grad="cublaslt", rank=2), "needs a plain layer"),
                         (LoRADense(8, weight_grad="cublaslt", use_bias=False), "needs a plain layer"),
                         (Attention(2, 2, 8, qkv_grad="cublaslt"), "Attention.qkv_grad='cublaslt' needs qkv='separate'")]:
        with pytest.raises(ValueError, match=match):
            layer.init(jax.random.key(0), x16)
    with pytest.raises(ValueError, match="wgrad: epilogue must be one of bgradb, bgrada; got 'dgelu'"):
        cublaslt.wgrad(jnp.zeros((4, 16), jnp.bfloat16), jnp.zeros((4, 8), jnp.bfloat16), "dgelu")
    with pytest.raises(ValueError, match=r"want x \[..., I\], w \[I, F\] and bias \[F\]"):
        dense(jnp.zeros((4, 16)), jnp.zeros((16, 8)), jnp.zeros(7))


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(cublaslt, "_state", {})
    monkeypatch.setenv("ZOO_CUBLASLT", "0")
    assert not cublaslt.available() and cublaslt.unavailable_reason() == "turned off by ZOO_CUBLASLT=0"
    assert cublaslt.wgrad_unavailable_reason() == "turned off by ZOO_CUBLASLT=0"
    monkeypatch.setattr(cublaslt, "_state", {})
    monkeypatch.delenv("ZOO_CUBLASLT")
    monkeypatch.setenv("ZOO_CUBLASLT_WGRAD", "0")  # the weight-gradient call alone
    assert cublaslt.wgrad_unavailable_reason() == "turned off by ZOO_CUBLASLT_WGRAD=0"
    with pytest.raises(UnavailableError, match="turned off by ZOO_CUBLASLT_WGRAD=0"):
        dense(jnp.zeros((4, 16), jnp.bfloat16), jnp.zeros((16, 8)), jnp.zeros(8), weight_grad="cublaslt")
    monkeypatch.delenv("ZOO_CUBLASLT_DGELU_W", raising=False)
    monkeypatch.delenv("ZOO_CUBLASLT_WGRAD_EPILOGUE", raising=False)
    assert (cublaslt.dgelu_w_layout(), cublaslt.wgrad_epilogue()) == ("kn", "bgradb")  # the defaults
    for env, bad, match in [("ZOO_CUBLASLT_DGELU_W", "nn", "ZOO_CUBLASLT_DGELU_W must be one of nk, kn; got 'nn'"),
                            ("ZOO_CUBLASLT_WGRAD_EPILOGUE", "bgrad",
                             "ZOO_CUBLASLT_WGRAD_EPILOGUE must be one of bgradb, bgrada; got 'bgrad'")]:
        monkeypatch.setenv(env, bad)
        with pytest.raises(ValueError, match=match):
            (cublaslt.dgelu_w_layout if "DGELU" in env else cublaslt.wgrad_epilogue)()
    monkeypatch.setattr(cublaslt, "_state", {})


@pytest.mark.gpu
def test_on_the_device_against_float64():
    """cuBLASLt's DGELU_BGRAD at GPT-124M's MLP widths (bf16, 4,096 rows) against float64 from the
    same bf16 inputs: dz within one bf16 rounding (the product from the float32 accumulator,
    rounded once), the column sums within a bf16 rounding plus the rounding noise of the sums."""
    from zoo.ops.matmul_gelu import gelu_tanh_grad

    if not cublaslt.available():
        pytest.skip(cublaslt.unavailable_reason())
    M = 4096
    g, w, z = _inputs(jnp.bfloat16, M=M, K=768, N=3072, seed=3)
    dz, db = jax.jit(lambda g, w, z: matmul_gelu_grad(g, w, z, implementation="cublaslt"))(g, w, z)
    ref = (np.asarray(g, np.float64) @ np.asarray(w, np.float64).T
           * np.asarray(gelu_tanh_grad(jnp.asarray(z, jnp.float32)), np.float64))
    np.testing.assert_allclose(np.asarray(dz, np.float64), ref, rtol=1.1 * 2.0**-8, atol=1e-3)
    noise = np.sqrt(M) * np.sqrt(np.mean(ref**2)) * 2.0**-8
    np.testing.assert_allclose(np.asarray(db), ref.sum(0), rtol=2.0**-8, atol=3 * noise)


@pytest.mark.gpu
def test_weight_gradients_on_the_device_against_float64():
    """cuBLASLt's BGRADB at GPT-124M's q/k/v width (bf16, 4,096 rows) against float64 from the same
    bf16 inputs: dense's w and bias gradients each within one bf16 rounding (float32 sums,
    rounded once)."""
    if cublaslt.wgrad_unavailable_reason():
        pytest.skip(cublaslt.wgrad_unavailable_reason())
    rng = np.random.default_rng(10)
    x, dy = (jnp.asarray(rng.standard_normal((4096, 768)), jnp.bfloat16) for _ in range(2))
    w, b = jnp.zeros((768, 768), jnp.float32), jnp.zeros(768, jnp.float32)
    dw, db = jax.jit(lambda x, w, b, dy: jax.vjp(lambda w, b: dense(x, w, b, weight_grad="cublaslt"), w, b)[1](dy))(
        x, w, b, dy)
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    np.testing.assert_allclose(np.asarray(dw, np.float64), x64.T @ dy64, rtol=1.1 * 2.0**-8, atol=1e-3)
    np.testing.assert_allclose(np.asarray(db, np.float64), dy64.sum(0), rtol=1.1 * 2.0**-8, atol=1e-3)


@pytest.mark.skipif(not CUDA_PLUGIN, reason="needs JAX's CUDA plugin (jax-cuda13-plugin), not a GPU")
def test_compiles_for_an_h200_to_one_call_per_layer(monkeypatch):
    """Compiled for an H200 here (zoo.bench.hlo, no GPU): at GPT-124M's B64 MLP shapes the op is
    the one custom call (with w as it is, or transposed first), reading g, w and z once and
    writing dz and the sums (counted by zoo.bench.hlo as a matmul with z read by its epilogue),
    moving under 0.6x of XLA's form;
    a small GPT's train step has one call per layer, and none of XLA's GELU-backward passes; with
    qkv_grad="cublaslt" also one weight-gradient call per q/k/v projection, which at GPT-124M's
    shape reads x and dy once and leaves no pass over dy."""
    import dataclasses

    import optax

    from zoo.bench import hlo
    from zoo.models.gpt import GPTConfig, make_gpt
    from zoo.train.state import init_state
    from zoo.train.strategy import make_train_step

    S = jax.ShapeDtypeStruct
    M, K, N = 65536, 768, 3072
    args = (S((M, K), jnp.bfloat16), S((N, K), jnp.bfloat16), S((M, N), jnp.bfloat16))
    moved = {}
    for impl, w_layout in (("xla", "nk"), ("cublaslt", "nk"), ("cublaslt", "kn")):
        monkeypatch.setenv("ZOO_CUBLASLT_DGELU_W", w_layout)
        ls = hlo.launches(hlo.compile_for_gpu(lambda g, w, z, impl=impl: matmul_gelu_grad(
            g, w, z, implementation=impl), *args).as_text())
        moved[impl] = sum(x.bytes for x in ls if w_layout == "nk" or x.kind == "gemm")  # "kn": + w's transpose
        if impl == "cublaslt":
            (call,) = [x for x in ls if x.kind == "gemm"]  # the call, and no matmul of XLA's
            assert call.kind == "gemm" and call.flops == 2 * M * N * K and call.aux == 2 * M * N
            assert call.read == 2 * (M * K + N * K + M * N) and call.written == 2 * M * N + 2 * N
    assert moved["cublaslt"] < 0.6 * moved["xla"], moved
    monkeypatch.delenv("ZOO_CUBLASLT_DGELU_W")
    assert not cublaslt.available() or jax.default_backend() == "gpu"  # the compile-only state is gone

    cfg = GPTConfig(vocab_size=256, max_len=64, num_layers=2, hidden=128, num_heads=2, dtype="bfloat16",
                    gelu="epilogue", implementation="cudnn")
    tx = optax.adamw(1e-3)
    batch = {"x": S((8, 65), jnp.int32), "idx": S((8,), jnp.int32)}
    counts = {}
    for name, change in [("xla", {}), ("gelu_grad", dict(gelu_grad="cublaslt")),
                         ("both", dict(gelu_grad="cublaslt", qkv="separate", qkv_grad="cublaslt"))]:
        md = make_gpt(dataclasses.replace(cfg, **change))
        with hlo.tracing_for_gpu("h200"):
            state = jax.eval_shape(lambda k, b, md=md: init_state(md.init(k, b), tx, 0.0), jax.random.PRNGKey(0), batch)
        text = hlo.compile_for_gpu(make_train_step(md, tx, 0.0), state, S((2,), jnp.uint32), batch,
                                   donate_argnums=(0,)).as_text()
        counts[name] = tuple(text.count(f'custom_call_target="{t}"') for t in cublaslt.HANDLERS)
    # DGELU: one per layer; BGRADB: one per layer's q, k and v projections
    assert counts == {"xla": (0, 0), "gelu_grad": (2, 0), "both": (2, 6)}, counts

    # one weight-gradient call at GPT-124M's B64 q/k/v shape: a matmul, reading x and dy once
    x, w, b = S((M, K), jnp.bfloat16), S((K, K), jnp.float32), S((K,), jnp.float32)
    ls = hlo.launches(hlo.compile_for_gpu(lambda x, w, b, dy: jax.vjp(
        lambda w, b: dense(x, w, b, weight_grad="cublaslt"), w, b)[1](dy), x, w, b, x).as_text())
    (call,) = [x for x in ls if x.kind == "gemm"]
    assert call.flops == 2 * M * K * K and call.read == 2 * 2 * M * K and call.written == 2 * K * K + 2 * K
    # no pass over dy of its own: the rest is dw and db turned float32 (dw transposed back)
    assert sum(x.bytes for x in ls if x.kind != "gemm") <= 3 * (2 * K * K + 2 * K)


def _exported(path) -> set[str]:
    r = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return {line.split()[-1] for line in r.stdout.splitlines() if line.split()[-2] in "TWVBDRtwvbdr"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU ld's --exclude-libs")
@pytest.mark.parametrize("kept_local", [True, False])
def test_a_statically_linked_libstdcxx_stays_inside_the_library(tmp_path, monkeypatch, kept_local):
    """Where the toolchain links libstdc++ into the library (the lent GPU machines' /opt/gcc g++
    did: the cuDNN frontend then crashed formatting an int, the process's libstdc++.so.6 having
    interposed part of the library's copy), the library exports what the usual build (libstdc++
    linked dynamically) exports, and no symbol of libstdc++'s own. The control (kept_local False:
    without native.self_contained()'s flags) exports libstdc++'s, its stream and locale code."""
    def build(name, flags):
        monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / name))
        monkeypatch.setenv("ZOO_CUBLASLT_CXXFLAGS", flags)
        return _exported(cublaslt.build())

    usual = build("usual", "")
    if not kept_local:
        monkeypatch.setattr(native, "self_contained", lambda: [])
    try:
        static = build("static", "-static-libstdc++ -static-libgcc")
    except cublaslt.Unavailable as e:
        pytest.skip(f"no static libstdc++ to link here: {str(e)[-200:]}")
    assert {*cublaslt.HANDLERS.values(), "zoo_cublaslt_init"} <= usual
    streams = [s for s in static if s.startswith(("_ZNSo", "_ZNSt8ios_base", "_ZNSt6locale"))]
    if kept_local:
        assert static == usual, sorted(static - usual)[:10]
        assert not streams
    else:
        assert len(static - usual) > 100 and streams
