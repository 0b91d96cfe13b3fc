"""Joining or starting Ray for ``serve --replicas``, ``batch`` and ``harvest --workers``.

>>> start_ray(None, num_cpus=2)  # doctest: +SKIP
"""
from __future__ import annotations

import os
from typing import Any

STARTUP_TRIES = 3
# For Ray Serve (``serve --replicas``), each measured on 2 cores as CPU per streamed token: Serve's defaults move
# every streamed message between two event loops (threads) in each replica and in the proxy's handle, and the
# engines' app never blocks its loop, so it runs in Serve's own loop; no autoscaling, so no metrics from the
# handles; the proxy streams from the engines over gRPC (its CPU per token 0.9 -> 0.6 ms); the controller's loop
# runs once a second, not ten times (0.4 -> 0.2 ms; a dead engine is still dropped at its first failed call); the
# proxy runs ``server.replica_routing.ProxyFront`` in front of its routing. Ray's processes read them from the
# environment Ray started in: a local Ray started here gets them; for a cluster started with ``ray start``, export
# them before it. The engines also get them as their runtime env.
SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
             "RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE": "0", "RAY_SERVE_PROXY_USE_GRPC": "1",
             "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1",
             "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "rocmforge.server.replica_routing.proxy_middlewares"}


def start_ray(address: str | None = None, **options: Any) -> None:
    """``ray.init(address, include_dashboard=False, **options)`` unless Ray already runs in this process.

    On a loaded machine a local Ray's dashboard agent can import slower than the raylet waits for it (15 s; the
    raylet then exits and ``ray.init`` says "timed out during startup"): that start is tried ``STARTUP_TRIES``
    times before the error stands.
    """
    import ray

    if ray.is_initialized():
        return
    for name, value in SERVE_ENV.items():  # a Ray started here passes them on to Serve's processes
        os.environ.setdefault(name, value)
    for attempt in range(STARTUP_TRIES):
        try:
            ray.init(address=address, include_dashboard=False, **options)
            return
        except Exception as exc:  # noqa: BLE001 - only that startup race is retried
            ray.shutdown()
            if "timed out during startup" not in str(exc) or attempt == STARTUP_TRIES - 1:
                raise
