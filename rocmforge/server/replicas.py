"""``rocmforge serve --replicas N``: N engines on Ray Serve behind one OpenAI-compatible endpoint.

One Ray Serve deployment, ``engine``, of N replicas, each running the very app ``rocmforge serve`` runs
(``build.build_app`` → ``app.create_app``: same routes, auth, limits and errors) as the deployment's FastAPI
ingress. Ray Serve's HTTP proxy sends every request straight to one replica; ``replica_routing`` steers it
(affinity: a conversation's requests reach the engine holding its KV cache) and turns an engine's death into a
clear error: its in-flight requests fail at once (503 ``replica_failed``, or a final error event for a stream
under way), new requests go to the live engines, and Ray starts a new one. Each engine takes one GPU when the
cluster has enough, else an equal share of the CPUs, and is named by its replica rank (``engine0`` ...), which every
response carries in ``X-Rocmforge-Replica``.

>>> app = build_application(ServeOptions(model="smollm2-135m", device="cpu"), replicas=2,
...                         actor_options={"num_cpus": 1})  # doctest: +SKIP
>>> serve.run(app, name="rocmforge", route_prefix="/")  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.config import RequestRouterConfig

from rocmforge.ray_start import SERVE_ENV
from rocmforge.server.build import ServeOptions, build_app
from rocmforge.server.replica_routing import FRONT_HEADER, REPLICA_HEADER, AffinityRouter

log = logging.getLogger(__name__)

APP_NAME = "rocmforge"



class _NameEachResponse:
    """Adds ``X-Rocmforge-Replica`` to every response; warns once when requests arrive without ``ProxyFront``."""

    def __init__(self, app: Any, name: str):
        self.app, self.name, self.warned = app, name.encode(), False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self.warned and not any(k == FRONT_HEADER.encode() for k, _ in scope["headers"]):
            self.warned = True
            log.warning("a request reached %s without rocmforge's proxy front: no affinity and no clear errors "
                        "when an engine dies; export %s before `ray start`", self.name.decode(), SERVE_ENV)

        async def named(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (REPLICA_HEADER.encode(), self.name)]}
            await send(message)

        await self.app(scope, receive, named)


@serve.deployment(name="engine", max_ongoing_requests=1024, health_check_period_s=5, health_check_timeout_s=30,
                  request_router_config=RequestRouterConfig(request_router_class=AffinityRouter))
@serve.ingress()
class EngineReplica:
    """One engine: ``rocmforge serve``'s app as this replica's ingress, named ``engine<rank>``."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.name = f"engine{serve.get_replica_context().rank.rank}"

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The app (Ray Serve runs its lifespan, which starts the scheduler thread)."""
        self.server_app, self._close = build_app(self.options)
        self.server_app.add_middleware(_NameEachResponse, name=self.name)
        return self.server_app

    def record_replica_metadata(self) -> dict[str, str]:
        """What the router knows this engine by."""
        return {"name": self.name}

    def identity(self) -> tuple[str, int]:
        """The engine's name and process id (for operators, and for the test that kills one)."""
        return self.name, os.getpid()

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes Ray replace the engine."""
        if not self.server_app.state.server.scheduler.alive:
            raise RuntimeError("the engine's scheduler thread has stopped")

    def __del__(self) -> None:
        if hasattr(self, "_close"):
            self._close()


def build_application(options: ServeOptions, replicas: int, actor_options: dict[str, Any]) -> Any:
    """The Ray Serve application: ``replicas`` engines, each with ``actor_options``."""
    return EngineReplica.options(num_replicas=replicas,
                                 ray_actor_options={**actor_options,
                                                    "runtime_env": {"env_vars": SERVE_ENV}}).bind(options)


def engine_resources(options: ServeOptions, replicas: int, cluster: dict[str, float]) -> tuple[ServeOptions, dict]:
    """One GPU per engine when the cluster has one for each (and the device allows it), else a share of the CPUs."""
    gpus, cpus = int(cluster.get("GPU", 0)), int(cluster.get("CPU", 1))
    if options.device not in ("cpu", "cpu-exact") and gpus >= replicas:
        return options, {"num_gpus": 1, "num_cpus": 1}
    if options.device not in ("auto", "cpu", "cpu-exact"):
        raise RuntimeError(f"--device {options.device} needs {replicas} GPUs; the Ray cluster has {gpus}")
    share = max(1, cpus // replicas)
    return replace(options, threads=options.threads or share), {"num_cpus": share}


def serve_replicas(options: ServeOptions, replicas: int, host: str, port: int, ray_address: str | None) -> None:
    """Start (or join) Ray, deploy the engines and the router, serve on ``host:port`` until interrupted."""
    import ray

    from rocmforge.ray_start import start_ray

    start_ray(ray_address)
    options, actor_options = engine_resources(options, replicas, ray.cluster_resources())
    log.info("%d engine(s), each with %s", replicas, actor_options)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_application(options, replicas, actor_options), name=APP_NAME, route_prefix="/",
                  blocking=True)
    finally:
        serve.shutdown()
