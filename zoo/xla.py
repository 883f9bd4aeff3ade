"""XLA compiler options the zoo compiles its own programs with, and `jit`, jax.jit with them.

On a CPU, XLA (jaxlib 0.10 to 0.12) hands dots and convolutions to YNNPACK ("library fusions").
On the zoo's 2-core AVX2 machine YNNPACK's convolutions are the slow part of every conv net: the
DDPM UNet's forward (`unet-small32`, batch 8) takes 163 ms with them and 105 ms with XLA's own
convolutions (outputs within 4e-6), and a `ddpm` train step on digits runs 1.5x faster (DiT, with
its patchify convolution: 1.2x; ViT: 1.1x). YNNPACK's dots are the fast ones (attention, Gibbs
chains, MLPs), so the zoo keeps those: `xla_cpu_experimental_ynn_fusion_type` = individual dots
only. The option goes to each program the zoo compiles (training and init steps of the jit
strategies -- jax.pmap takes no compiler options --, evaluation, sampling, the diffusion
benchmark), not to the process: a user's own jax.jit is untouched, and can opt in with
`jax.jit(f, compiler_options=zoo.xla.compiler_options())`. Setting the same flag in XLA_FLAGS
wins over the zoo's choice, and a JAX whose XLA lacks the option gets none.
"""

from __future__ import annotations

import functools
import os

import jax

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {YNN_FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.lru_cache(maxsize=None)
def _cpu_options_supported() -> bool:
    try:  # the option's name and value are XLA internals: check this XLA takes them
        jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS)(0.0).block_until_ready()
    except Exception:  # noqa: BLE001 (an XLA without the option rejects it at compile time)
        return False
    return True


def compiler_options(**extra) -> dict:
    """The zoo's compiler options for the default backend (see the module doc), with `extra` on
    top. Computed when called (it asks JAX for the backend), so call it where a program is built,
    not at import."""
    opts = {}
    if (jax.default_backend() == "cpu" and YNN_FLAG not in os.environ.get("XLA_FLAGS", "")
            and _cpu_options_supported()):
        opts.update(CPU_OPTIONS)
    opts.update(extra)
    return opts


def jit(fun, **kwargs):
    """jax.jit(fun, **kwargs) with `compiler_options()` (kwargs' own compiler_options win)."""
    return jax.jit(fun, compiler_options=compiler_options(**kwargs.pop("compiler_options", None) or {}),
                   **kwargs)


def init_compiler_options() -> dict:
    """Options for compiling a model's init: it runs once, so on CPU also skip LLVM's optimisation
    passes, which cost most of its compile time there (a small UNet: 34 s -> 9 s, mostly the
    threefry draws of ~150 initialisers)."""
    if jax.default_backend() == "cpu":
        return compiler_options(xla_backend_optimization_level=0)
    return compiler_options()
