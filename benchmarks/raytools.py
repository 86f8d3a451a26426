"""A local Ray for the benchmarks: started once per process, timed, shut down at exit."""

from __future__ import annotations

import atexit
import time

_INIT_S: float | None = None


def ensure_ray(num_cpus: int = 2) -> float:
    """Start a local Ray (no dashboard) if none is running; return its start-up seconds."""
    global _INIT_S
    import ray

    if ray.is_initialized():
        return _INIT_S or 0.0
    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    _INIT_S = time.perf_counter() - t0
    atexit.register(ray.shutdown)
    return _INIT_S
