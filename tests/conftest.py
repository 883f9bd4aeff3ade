"""8 fake CPU devices for every test (set before JAX is imported)."""

import os

# Tests run tiny arrays, so XLA's compile time is most of the suite: LLVM's optimisation passes
# off (level 0) halve it (attention + transformer tests: 226 s -> 106 s on 2 cores); the values
# are the same, only the generated CPU code is slower, which tiny arrays never notice.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["ZOO_COMPILATION_CACHE"] = ""  # hermetic tests: no persistent XLA cache from the CLI

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "cpu":
        skip = pytest.mark.skip(reason="needs an accelerator")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
