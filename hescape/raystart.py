"""Start or join Ray, surviving a slow local start-up.

On a loaded machine a local ``ray.init()`` can fail with "The current node timed out
during startup" (Ray waits a fixed 30 s for its raylet to register). That is transient:
``init_ray`` shuts the half-started node down and tries again, a bounded number of times,
then fails with a message that says what to do. Joining a cluster (``address`` or
``RAY_ADDRESS``) is not retried here: a wrong address should fail at once.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = "timed out during startup"


def init_ray(address: str | None = None, *, log_to_driver: bool = True,
             attempts: int = 3, backoff_s: float = 2.0,
             logging_level: int = logging.INFO) -> None:
    """``ray.init`` unless already initialised: join ``address``/``RAY_ADDRESS`` or start a
    local node (dashboard off) with up to ``attempts`` tries on a start-up timeout.
    ``logging_level``: Ray's own driver-side log level (WARNING: no "Started a local Ray
    instance" line). Probe the address first (``hescape.endpoints.ray_address_problem``):
    ``ray.init`` retries a dead address for minutes."""
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=log_to_driver, logging_level=logging_level)
        return
    for attempt in range(1, attempts + 1):
        try:
            ray.init(include_dashboard=False, log_to_driver=log_to_driver,
                     logging_level=logging_level)
            return
        except Exception as exc:  # Ray raises a bare Exception for this
            if STARTUP_TIMEOUT not in str(exc):
                raise
            ray.shutdown()
            if attempt == attempts:
                raise RuntimeError(
                    f"local Ray did not start in {attempts} attempts ({exc}); the machine is "
                    "probably overloaded: stop other Ray instances (`ray stop`) or start Ray "
                    "yourself (`ray start --head`) and pass --address") from exc
            log.warning("Ray start-up timed out (attempt %d/%d); retrying", attempt, attempts)
            time.sleep(backoff_s * attempt)
