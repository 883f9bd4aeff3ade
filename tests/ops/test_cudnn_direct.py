"""zoo.ops.cudnn_direct and zoo.ops.attention's "cudnn-direct": where it is available and why not,
the header search, the library's build and entry points (where the headers are), the custom_vjp's
wiring (forward by the direct call, gradients by JAX's cuDNN call) against NumPy, auto's choice,
and, on a GPU, the values against the reference and "cudnn"."""

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops.test_attention import _inputs, np_attention
from zoo.ops import attention as A
from zoo.ops import cudnn_direct


@pytest.fixture
def fresh(monkeypatch):
    """cudnn_direct as if not loaded yet in this process."""
    monkeypatch.setattr(cudnn_direct, "_state", {})
    return cudnn_direct


def test_unavailable_off_an_nvidia_gpu_with_the_reason(fresh):
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is here")
    assert not fresh.available()
    assert "needs an NVIDIA GPU" in fresh.unavailable_reason()
    q, k, v = _inputs(T=8, S=8, D=8, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match='"cudnn-direct" takes bfloat16'):
        A.dot_product_attention(q, k, v, implementation="cudnn-direct")
    assert A._auto(q, k, None, None, True, None, v) != "cudnn-direct"


def test_off_a_gpu_the_cudnn_implementations_are_clear_errors_down_to_the_cli(tmp_path):
    """A cuDNN implementation asked for where none can run: a ZooError (a ValueError or a
    RuntimeError for library callers), so `zoo train` prints one `error:` line, no traceback."""
    import subprocess
    import sys

    from zoo.errors import ConfigError, UnavailableError

    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is here")
    q, k, v = _inputs(T=8, S=8, D=8, dtype=jnp.bfloat16)
    with pytest.raises(ConfigError, match='"cudnn-direct" takes'):
        A.dot_product_attention(q, k, v, implementation="cudnn-direct")
    with pytest.raises(UnavailableError, match="implementation 'cudnn' cannot run here"):
        A.dot_product_attention(q, k, v, implementation="cudnn")
    out = subprocess.run([sys.executable, "-m", "zoo", "train", "gpt", "--workdir", str(tmp_path / "run"), "--steps",
                          "1", "model.implementation=cudnn-direct", "model.num_layers=1", "model.hidden=32"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert 'error: implementation "cudnn-direct" takes' in out.stderr


def test_turned_off_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv("ZOO_CUDNN_DIRECT", "0")
    assert not fresh.available() and "ZOO_CUDNN_DIRECT=0" in fresh.unavailable_reason()


def test_header_search_finds_each_header_once_or_names_what_is_missing(tmp_path, monkeypatch):
    a, b = tmp_path / "cuda", tmp_path / "frontend"
    for d, headers in ((a, ("cuda.h", "nvrtc.h", "cudnn.h")), (b, ("cudnn.h", "cudnn_frontend.h"))):
        d.mkdir()
        for h in headers:
            (d / h).write_text("")
    monkeypatch.setattr(cudnn_direct, "_candidate_dirs", lambda: [tmp_path / "none", a, b])
    assert cudnn_direct.include_dirs() == [jax.ffi.include_dir(), str(a), str(b)]
    monkeypatch.setattr(cudnn_direct, "SYSTEM_INCLUDES", (str(b),))  # found there, not named with -I
    assert cudnn_direct.include_dirs() == [jax.ffi.include_dir(), str(a)]
    (b / "cudnn_frontend.h").unlink()
    with pytest.raises(cudnn_direct.Unavailable, match=r"cudnn_frontend\.h \(from `pip install nvidia-cudnn-frontend`\)"):
        cudnn_direct.include_dirs()


def test_builds_and_its_init_reports_a_missing_cudnn(tmp_path, monkeypatch):
    """Where the headers are (CUDA, cuDNN, the cuDNN frontend; none in CI): the source compiles, the
    library loads without CUDA (nothing linked), exports the handler and the init, and the init
    says why when it finds no cuDNN."""
    try:
        cudnn_direct.include_dirs()
    except cudnn_direct.Unavailable as e:
        pytest.skip(str(e))
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path))
    lib = ctypes.CDLL(str(cudnn_direct.build()))
    assert lib.ZooCudnnAttentionForward
    lib.zoo_cudnn_init.restype = ctypes.c_int64
    error = ctypes.create_string_buffer(256)
    if jax.default_backend() == "cpu":  # no cuDNN loaded in this process, and a path that is not one
        assert lib.zoo_cudnn_init(str(tmp_path / "libcudnn.so.9").encode(), error, ctypes.c_int64(256)) == 0
        assert error.value.startswith(b"cannot load cuDNN")


@pytest.mark.parametrize("causal", [False, True])
def test_forward_by_the_direct_call_gradients_by_the_other(monkeypatch, causal):
    """The custom_vjp with the direct call replaced by a recording stand-in: undifferentiated, its
    value is the stand-in's (NumPy's attention); differentiated, the forward and the gradients are
    DIRECT_GRAD's ("xla" here, "cudnn" on a GPU) and the stand-in is not called."""
    calls = []

    def stand_in(q, k, v, *, scale, is_causal):
        calls.append(is_causal)
        return A._reference(q, k, v, None, None, is_causal, None, scale)

    monkeypatch.setattr(cudnn_direct, "attention_forward", stand_in)
    monkeypatch.setattr(A, "DIRECT_GRAD", "xla")
    q, k, v = _inputs(T=5, S=7, N=4, K=2, D=8, seed=4)
    scale = 0.3
    out = A._direct(q, k, v, causal, scale)
    assert calls == [causal]
    np.testing.assert_allclose(out, np_attention(q, k, v, is_causal=causal, scale=scale), rtol=1e-5, atol=1e-5)

    w = jnp.asarray(np.random.default_rng(1).normal(size=out.shape), jnp.float32)
    loss = lambda f: lambda q, k, v: jnp.sum(w * f(q, k, v))  # noqa: E731
    got = jax.grad(loss(lambda q, k, v: A._direct(q, k, v, causal, scale)), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: A.dot_product_attention(
        q, k, v, is_causal=causal, scale=scale, implementation="reference")), (0, 1, 2))(q, k, v)
    assert calls == [causal]  # the gradient never ran the forward-only call
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_auto_takes_the_direct_call_where_asked_for_applies_and_builds(monkeypatch):
    """Auto takes it only with ZOO_CUDNN_DIRECT=1 (until a lent GPU has run it through), where it
    applies (no bias, mask or window; q, k, v in one dtype) and is available."""
    monkeypatch.setattr(A, "_cudnn_applies", lambda q, k: True)
    q, k, v = _inputs(T=8, S=8, D=8, dtype=jnp.bfloat16)
    monkeypatch.setattr(cudnn_direct, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cudnn_direct, "available", lambda: True)
    for unset in ("", "0", "yes"):
        monkeypatch.setenv("ZOO_CUDNN_DIRECT", unset)
        assert A._auto(q, k, None, None, True, None, v) == "cudnn"
        assert "ZOO_CUDNN_DIRECT=1" in cudnn_direct.chosen_by_auto()
    monkeypatch.setenv("ZOO_CUDNN_DIRECT", "1")
    assert cudnn_direct.chosen_by_auto() is None
    assert A._auto(q, k, None, None, True, None, v) == "cudnn-direct"
    assert A._auto(q, k, None, jnp.ones((1, 1, 8, 8), bool), False, None, v) == "cudnn"  # a mask
    assert A._auto(q, k, jnp.zeros((8, 8)), None, False, None, v) == "cudnn"  # a bias
    assert A._auto(q, k, None, None, True, (2, 0), v) == "cudnn"  # a window
    assert A._auto(q, k, None, None, True, None, v.astype(jnp.float16)) == "cudnn"  # v's dtype
    monkeypatch.setattr(cudnn_direct, "unavailable_reason", lambda: "no GPU")
    assert A._auto(q, k, None, None, True, None, v) == "cudnn" and cudnn_direct.chosen_by_auto() == "no GPU"


@pytest.mark.gpu
def test_direct_call_matches_the_reference_and_cudnn_on_the_device(monkeypatch):
    """On an NVIDIA GPU with the headers: the direct forward against float32 reference attention
    and JAX's cuDNN call (grouped heads, T != S, causal and not), its gradients "cudnn"'s,
    the compiled forward the FFI call (no cuDNN custom call of XLA's), and auto's choice."""
    if not cudnn_direct.available():
        pytest.skip(cudnn_direct.unavailable_reason())
    for T, S, causal in ((256, 256, True), (128, 384, False), (384, 128, True)):
        q, k, v = _inputs(B=2, T=T, S=S, N=8, K=2, D=64, seed=T + S, dtype=jnp.bfloat16)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        fwd = jax.jit(lambda q, k, v: A.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn-direct"))
        got = fwd(q, k, v)
        ref = A.dot_product_attention(*f32, is_causal=causal, implementation="reference")
        np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=2e-2, atol=2e-2)
        via_xla = A.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(via_xla, np.float32), rtol=1e-2, atol=1e-2)
        text = fwd.lower(q, k, v).compile().as_text()
        assert cudnn_direct.TARGET in text and "__cudnn$fmha" not in text
        loss = lambda impl: lambda q, k, v: jnp.sum(A.dot_product_attention(  # noqa: E731
            q, k, v, is_causal=causal, implementation=impl).astype(jnp.float32) ** 2)
        # the same programs; cuDNN's backward may sum dq in a different order from run to run
        for g, r in zip(jax.grad(loss("cudnn-direct"), (0, 1, 2))(q, k, v), jax.grad(loss("cudnn"), (0, 1, 2))(q, k, v)):
            r = np.asarray(r, np.float32)
            np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=1e-2, atol=1e-2 * float(np.abs(r).max()))
        monkeypatch.setenv("ZOO_CUDNN_DIRECT", "1")
        assert A._auto(q, k, None, None, causal, None, v) == "cudnn-direct"
        monkeypatch.delenv("ZOO_CUDNN_DIRECT")
        assert A._auto(q, k, None, None, causal, None, v) == "cudnn"


def test_compiles_for_an_h200_to_the_one_custom_call(monkeypatch):
    """With JAX's CUDA plugin and the headers here (no GPU): the forward, batch-partitioned, compiles
    for an H200 to one custom call of this target and nothing around it (no copy, no memset)."""
    from tests.bench.test_hlo import CUDA_PLUGIN
    from zoo.bench import hlo

    if not CUDA_PLUGIN:
        pytest.skip("needs JAX's CUDA plugin (jax-cuda13-plugin), not a GPU")
    try:
        cudnn_direct.include_dirs()
    except cudnn_direct.Unavailable as e:
        pytest.skip(str(e))
    lib = ctypes.CDLL(str(cudnn_direct.build()))
    jax.ffi.register_ffi_target(cudnn_direct.TARGET, jax.ffi.pycapsule(lib.ZooCudnnAttentionForward), platform="CUDA")
    q = jax.ShapeDtypeStruct((4, 1024, 16, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((4, 512, 4, 128), jnp.bfloat16)
    text = hlo.compile_for_gpu(lambda q, k, v: cudnn_direct._forward_by_batch(q, k, v, 0.125, True), q, kv, kv).as_text()
    entry = text[text.index("ENTRY"):]
    ops = [line.split("=", 1)[1].split("(")[0].split()[-1] for line in entry.splitlines()[1:] if " = " in line]
    assert ops == ["parameter", "parameter", "parameter", "custom-call"], ops
    assert f'custom_call_target="{cudnn_direct.TARGET}"' in entry and "bf16[4,1024,16,128]" in entry
