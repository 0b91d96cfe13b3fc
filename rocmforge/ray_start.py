"""Joining or starting Ray for ``serve --replicas``, ``batch`` and ``harvest --workers``.

>>> start_ray(None, num_cpus=2)  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any

STARTUP_TRIES = 3


def start_ray(address: str | None = None, **options: Any) -> None:
    """``ray.init(address, include_dashboard=False, **options)`` unless Ray already runs in this process.

    On a loaded machine a local Ray's dashboard agent can import slower than the raylet waits for it (15 s; the
    raylet then exits and ``ray.init`` says "timed out during startup"): that start is tried ``STARTUP_TRIES``
    times before the error stands.
    """
    import ray

    if ray.is_initialized():
        return
    for attempt in range(STARTUP_TRIES):
        try:
            ray.init(address=address, include_dashboard=False, **options)
            return
        except Exception as exc:  # noqa: BLE001 - only that startup race is retried
            ray.shutdown()
            if "timed out during startup" not in str(exc) or attempt == STARTUP_TRIES - 1:
                raise
