"""zoo.xla: the compiler options the zoo compiles its programs with (CPU: XLA's own convolutions,
YNNPACK's dots)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import xla


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _ynn_convolutions(compiled_text: str) -> int:
    """Convolutions inside YNNPACK fusions of a compiled CPU program: the computations that fusion
    call sites marked __ynn_fusion call."""
    called = re.findall(r"calls=(%[\w.\-]+)[^\n]*__ynn_fusion", compiled_text)
    blocks = {b.strip().split(" ", 1)[0]: b for b in compiled_text.split("\n\n")}
    return sum(blocks.get(name, "").count(" convolution(") for name in called)


def test_options_on_cpu_and_what_wins(monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("the CPU options only")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    opts = xla.compiler_options()
    if not xla._cpu_options_supported():
        assert opts == {}  # an XLA without the option: nothing passed, nothing breaks
        return
    assert opts == xla.CPU_OPTIONS
    assert xla.compiler_options(xla_backend_optimization_level=0) == {**xla.CPU_OPTIONS,
                                                                      "xla_backend_optimization_level": 0}
    assert xla.init_compiler_options()["xla_backend_optimization_level"] == 0
    # the user's XLA_FLAGS choice wins: the zoo then passes nothing of its own
    monkeypatch.setenv("XLA_FLAGS", f"--{xla.YNN_FLAG}=")
    assert xla.compiler_options() == {}


def test_zoo_jit_keeps_convolutions_out_of_ynnpack_and_values_equal(monkeypatch):
    """A 3x3 conv at a UNet's shapes: same values as jax.jit's program (float32 rounding), and in
    the zoo's program no convolution runs inside a YNNPACK fusion."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 32, 32, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 64, 64)) / 24, jnp.float32)
    ours, theirs = xla.jit(_conv), jax.jit(_conv)
    np.testing.assert_allclose(ours(x, w), theirs(x, w), rtol=1e-4, atol=1e-4)
    if jax.default_backend() == "cpu" and xla._cpu_options_supported():
        assert _ynn_convolutions(ours.lower(x, w).compile().as_text()) == 0
        # what the option changes, where this XLA's default does send the convolution to YNNPACK
        default = _ynn_convolutions(theirs.lower(x, w).compile().as_text())
        print(f"convolutions in YNNPACK fusions by default: {default}")
    # kwargs pass through, and an explicit compiler option is added to the zoo's
    f = xla.jit(lambda a, n: a * n, static_argnums=1, compiler_options={"xla_backend_optimization_level": 1})
    assert float(f(jnp.float32(2.0), 3)) == 6.0
