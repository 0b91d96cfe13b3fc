"""``rocmforge serve --replicas N``: N engines on Ray Serve behind one OpenAI-compatible endpoint.

Each engine is its own Ray Serve deployment (``engine0`` ... ``engineN-1``, one replica each) running the very app
``rocmforge serve`` runs (``build.build_app`` → ``app.create_app``: same routes, auth, limits and errors), driven
in-process as an ASGI app. It takes one GPU when the cluster has enough, else an equal share of the CPUs.

In front, one ``Router`` deployment (no CPU reserved) receives every HTTP request from Ray Serve's proxy and
forwards it, body and headers as they came, to one engine, streaming the engine's response back:
- affinity: a request that names a conversation goes to the same engine as the conversation's earlier
  requests, whose KV cache holds its prefix. The key is the ``X-Session-ID`` header, else the conversation's
  start (chat: the messages up to the first user message; completion: the prompt's first 256 characters).
  Engines are ranked for a key by rendezvous hashing, so when one is down only its own keys move elsewhere.
  Requests without a key (models, embeddings, context) go to the engine with the fewest in flight.
- failure: when an engine dies its in-flight requests fail at once with a clear error (503
  ``replica_failed``: plain answers are relayed whole, so they are complete or this error; a stream that
  already started ends with an error event, as the server's own engine errors do), the router sends new requests elsewhere for ``DOWN_SECONDS``, and Ray starts a new engine.
Every response carries ``X-Rocmforge-Replica`` (which engine answered).

>>> app = build_application(ServeOptions(model="smollm2-135m", device="cpu"), replicas=2,
...                         actor_options={"num_cpus": 1})  # doctest: +SKIP
>>> serve.run(app, name="rocmforge", route_prefix="/")  # doctest: +SKIP
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from rocmforge.server.build import ServeOptions, build_app
from rocmforge.server.errors import error_body

log = logging.getLogger(__name__)

APP_NAME = "rocmforge"
REPLICA_HEADER = "x-rocmforge-replica"
SESSION_HEADER = "x-session-id"
DOWN_SECONDS = 30.0  # how long a failed engine gets no new requests (Ray restarts it meanwhile)
PREFIX_CHARS = 256
# Ray Serve's defaults move every streamed message between two event loops (threads) in each replica, and in the
# router's handle; the router and the engines' apps never block their loop, so they run in Serve's own loop
# (2 cores: the router's and the proxy's CPU per token down by about a sixth). No autoscaling: no metrics from the
# handles. The router and engines get them as their runtime env; Ray's proxy reads them from the environment Ray
# started in (serve_replicas sets them; for a cluster started with ``ray start``, export them before it).
SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
             "RAY_SERVE_COLLECT_AUTOSCALING_METRICS_ON_HANDLE": "0"}
# the scope keys an app needs; the rest of the proxy's scope (its app, router, state) stays behind
_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "headers",
               "client", "server")


def affinity_key(headers: dict[str, str], body: bytes) -> str | None:
    """What ties a request to an engine: its session header, or the start of its conversation (None: nothing)."""
    if headers.get(SESSION_HEADER):
        return "session:" + headers[SESSION_HEADER]
    try:
        payload = json.loads(body) if body else None
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    messages = payload.get("messages")
    if isinstance(messages, list):
        head = []
        for message in messages:
            head.append(message)
            if isinstance(message, dict) and message.get("role") == "user":
                break
        return "chat:" + json.dumps(head, sort_keys=True)
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return "prompt:" + prompt[:PREFIX_CHARS]
    if isinstance(prompt, list):
        return "prompt:" + json.dumps(prompt[:PREFIX_CHARS // 4])
    return None


def rendezvous_order(key: str, n: int) -> list[int]:
    """Engines ranked for ``key`` (highest random weight first): removing one engine moves only its keys."""
    weight = lambda i: hashlib.sha256(f"{key}|{i}".encode()).digest()  # noqa: E731
    return sorted(range(n), key=weight, reverse=True)


@serve.deployment(max_ongoing_requests=1024, health_check_period_s=5, health_check_timeout_s=30)
class EngineReplica:
    """One engine: ``rocmforge serve``'s app, driven as an ASGI app inside a Ray Serve replica."""

    def __init__(self, options: ServeOptions):
        self.app, self._close = build_app(options)
        self._start_lock = asyncio.Lock()
        self._started = False

    async def _ensure_started(self) -> None:
        """Run the app's lifespan startup once (it starts the scheduler thread)."""
        async with self._start_lock:
            if self._started:
                return
            inbox: asyncio.Queue[dict] = asyncio.Queue()
            outbox: asyncio.Queue[dict] = asyncio.Queue()
            await inbox.put({"type": "lifespan.startup"})
            self._lifespan = asyncio.create_task(self.app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                                          inbox.get, outbox.put))
            message = await outbox.get()
            if message["type"] != "lifespan.startup.complete":
                raise RuntimeError(f"the app did not start: {message.get('message')}")
            self._started = True

    async def asgi(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[dict[str, Any]]:
        """Run one HTTP request through the app; yields its ASGI send messages as they come."""
        await self._ensure_started()
        messages: asyncio.Queue[dict | None] = asyncio.Queue()
        left = asyncio.Event()  # the router cancelled the call: the client went away
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        task = asyncio.create_task(self.app(scope, receive, messages.put))
        task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                yield message
            task.result()  # an exception the app did not turn into a response
        finally:
            left.set()  # the app sees the disconnect and cancels the generation, freeing its KV blocks
            if not task.done():
                await asyncio.wait([task], timeout=10)

    def pid(self) -> int:
        """The engine's process id (for operators, and for the test that kills one)."""
        return os.getpid()

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes Ray replace the engine."""
        if self._started and not self.app.state.server.scheduler.alive:
            raise RuntimeError("the engine's scheduler thread has stopped")

    def __del__(self) -> None:
        self._close()


@serve.deployment(max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
class Router:
    """The endpoint: picks an engine per request (affinity, then load) and relays the engine's response."""

    def __init__(self, *engines: DeploymentHandle, max_body_bytes: int = 1 << 20):
        self.engines = list(engines)
        self.max_body_bytes = max_body_bytes
        self.in_flight = [0] * len(engines)
        self.down_until = [0.0] * len(engines)

    def _pick(self, key: str | None) -> int:
        now = time.monotonic()
        up = [i for i in range(len(self.engines)) if self.down_until[i] <= now] or list(range(len(self.engines)))
        if key is not None:
            return next(i for i in rendezvous_order(key, len(self.engines)) if i in up)
        return min(up, key=lambda i: (self.in_flight[i], i))

    def _failed(self, i: int, exc: BaseException) -> str:
        self.down_until[i] = time.monotonic() + DOWN_SECONDS
        log.warning("engine%d failed: %s: %s", i, type(exc).__name__, exc)
        return (f"replica engine{i} failed while answering ({type(exc).__name__}); this request was not completed "
                "and can be retried (Ray is restarting that replica; other replicas keep serving)")

    async def _read_body(self, request: Request) -> bytes:
        """The body, read up to one byte past the limit: the engine's own check then answers 413 as usual."""
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_body_bytes:
                break
        return b"".join(chunks)

    async def __call__(self, request: Request) -> Response:
        body = await self._read_body(request)
        i = self._pick(affinity_key(dict(request.headers), body))
        replica = {REPLICA_HEADER: f"engine{i}"}
        scope = {k: request.scope[k] for k in _SCOPE_KEYS if k in request.scope}
        scope["root_path"] = ""
        self.in_flight[i] += 1
        stream = self.engines[i].options(stream=True).asgi.remote(scope, body)
        try:
            start = await stream.__anext__()
        except (RayError, StopAsyncIteration) as exc:
            self.in_flight[i] -= 1
            message = self._failed(i, exc)
            return JSONResponse(error_body(503, message, code="replica_failed"), status_code=503, headers=replica)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}
        if headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(self._relay(stream, i), status_code=start["status"],
                                     headers={**headers, **replica})
        try:  # a plain answer is relayed whole, so an engine that dies before its end still gives a clean 503
            body = b"".join([m.get("body", b"") async for m in stream if m["type"] == "http.response.body"])
        except RayError as exc:
            message = self._failed(i, exc)
            return JSONResponse(error_body(503, message, code="replica_failed"), status_code=503, headers=replica)
        finally:
            self.in_flight[i] -= 1
        return Response(body, status_code=start["status"], headers={**headers, **replica})

    async def _relay(self, stream: Any, i: int) -> AsyncIterator[bytes]:
        """A stream's events as they come; an engine that dies mid-stream ends it with an error event."""
        try:
            async for message in stream:
                if message["type"] == "http.response.body" and message.get("body"):
                    yield message["body"]
        except RayError as exc:
            message = self._failed(i, exc)
            yield f"data: {json.dumps(error_body(503, message, code='replica_failed'))}\n\n".encode()
        finally:
            self.in_flight[i] -= 1
            stream.cancel()  # also when the client left: the engine stops generating


def build_application(options: ServeOptions, replicas: int, actor_options: dict[str, Any],
                      max_body_bytes: int = 1 << 20) -> Any:
    """The Ray Serve application: ``replicas`` engines (each with ``actor_options``) behind one ``Router``."""
    env = {"runtime_env": {"env_vars": SERVE_ENV}}
    engines = [EngineReplica.options(name=f"engine{i}", ray_actor_options={**actor_options, **env}).bind(options)
               for i in range(replicas)]
    return Router.options(ray_actor_options={"num_cpus": 0, **env}).bind(*engines, max_body_bytes=max_body_bytes)


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

    for name, value in SERVE_ENV.items():  # a Ray started here passes them on to Serve's processes
        os.environ.setdefault(name, value)
    start_ray(ray_address)
    options, actor_options = engine_resources(options, replicas, ray.cluster_resources())
    log.info("%d engine(s), each with %s", replicas, actor_options)
    serve.start(http_options={"host": host, "port": port})
    try:
        serve.run(build_application(options, replicas, actor_options), name=APP_NAME, route_prefix="/",
                  blocking=True)
    finally:
        serve.shutdown()
