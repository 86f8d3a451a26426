"""A local Ray for the benchmarks: started once per process, timed, shut down at exit."""

from __future__ import annotations

import atexit
import time

_INIT_S: float | None = None


def ensure_ray(num_cpus: int = 2, attempts: int = 3) -> float:
    """Start a local Ray (no dashboard) if none is running; return its start-up seconds.

    Ray gives its raylet a fixed 30 s to register; on a loaded shared machine that can time
    out, so start-up is retried (each failed attempt is shut down first).
    """
    global _INIT_S
    import ray

    if ray.is_initialized():
        return _INIT_S or 0.0
    for attempt in range(1, attempts + 1):
        t0 = time.perf_counter()
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except Exception:  # noqa: BLE001 - "node timed out during startup": retry
            ray.shutdown()
            if attempt == attempts:
                raise
            continue
        _INIT_S = time.perf_counter() - t0
        atexit.register(ray.shutdown)
        return _INIT_S
    raise RuntimeError("unreachable")
