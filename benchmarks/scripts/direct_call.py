"""What the checks of zoo's direct GPU calls (cudnn_direct_check.py, cublaslt_check.py) share: the
build, timed, and the load, each printed."""
import time

import jax


def ready(module, label: str, library: str) -> bool:
    """Build and load `module` (zoo.ops.cudnn_direct or zoo.ops.cublaslt), printing each step as
    `label: ...` and the loaded `library`'s version; False (printed why) where it cannot."""
    t = time.perf_counter()
    try:
        path = module.build()
    except module.Unavailable as e:
        print(f"{label}: not built: {e}", flush=True)
        return False
    print(f"{label}: {path} ready in {time.perf_counter() - t:.1f} s", flush=True)
    if not module.available():
        print(f"{label}: unavailable: {module.unavailable_reason()}", flush=True)
        return False
    print(f"{label}: loaded, {library} {module._state['version']}, jax {jax.__version__} {jax.devices()}", flush=True)
    return True
