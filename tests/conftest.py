"""8 fake CPU devices for every test (set before JAX is imported)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
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
