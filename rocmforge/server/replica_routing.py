"""How ``rocmforge serve --replicas N`` picks an engine: inside Ray Serve's HTTP proxy, with no process of its own.

Ray's proxy sends each request straight to one engine replica (``replicas.EngineReplica``, the app ``rocmforge
serve`` runs) and streams its answer back: one Ray hop per streamed token. Two pieces steer it:
- ``ProxyFront``, an ASGI middleware Ray's proxy runs in front of its routing (``proxy_middlewares``, named by
  ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``). It reads the body (up to the limit; the rest follows as it came),
  computes the request's affinity key (the ``X-Session-ID`` header, else the conversation's start: chat, the
  messages up to the first user message; completion, the prompt's first 256 characters) and hands its digest to
  Serve as the session id (a stable value per key, so any other app on the proxy keeps its own stickiness).
  When the proxy ends a response the engine did not finish (the engine died), it answers 503 ``replica_failed``
  instead, or, for a stream under way, ends it with an error event, as the server's own engine errors do.
- ``AffinityRouter``, the engines' Serve request router, running in the proxy: a request with a key goes to the
  engine rendezvous hashing ranks first among the live ones (a conversation's requests reach the engine holding
  its KV cache; when one engine is down only its keys move); a request without one to the engine with the
  fewest ongoing requests. It notes which engine took each request (by Serve's request id, the ``X-Request-ID``
  header, which the front sets when the client did not), so a failure names it.

>>> affinity_key({"x-session-id": "alice"}, b"")
'session:alice'
>>> rendezvous_order(key_digest("session:alice"), ["engine0", "engine1"])[0] in ("engine0", "engine1")
True
"""
from __future__ import annotations

import hashlib
import importlib
import json
import uuid
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
from starlette.middleware import Middleware

from rocmforge.server.errors import error_body

REPLICA_HEADER = "x-rocmforge-replica"
SESSION_HEADER = "x-session-id"  # the client's; also where Ray's proxy reads a session id (its default name)
REQUEST_ID_HEADER = "x-request-id"  # Ray's proxy takes it as the request id (and answers with it)
FRONT_HEADER = "x-rocmforge-front"  # what the engines see on a request that came through ProxyFront
MAX_NOTED = 4096  # engines noted for requests no front collects (handle calls from other processes)
PREFIX_CHARS = 256
MAX_BODY_BYTES = 1 << 20  # read past this the engine's own check answers 413
_ROUTED: dict[str, str] = {}  # request id -> the engine that took it (front and router run in the proxy's process)


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


def key_digest(key: str) -> str:
    """The affinity key as it travels to the router (a fixed length, whatever the conversation's size)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def rendezvous_order(digest: str, engines: list[str]) -> list[str]:
    """Engines ranked for a key (highest random weight first): removing one engine moves only its keys."""
    return sorted(engines, key=lambda name: hashlib.sha256(f"{digest}|{name}".encode()).digest(), reverse=True)


def failure_message(engine: str | None) -> str:
    return (f"replica {engine or 'engine'} failed while answering; this request was not completed and can be "
            "retried (Ray is restarting that replica; other replicas keep serving)")


class ProxyFront:
    """Ray's proxy app behind this: sets the session id Serve routes by, and turns an unfinished answer into an error.

    The session id Serve sees is the affinity key's digest (no session id without a key); any client header Ray
    would read as a session id is replaced.
    """

    def __init__(self, app: Any, max_body_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body, more_body = await self._read_body(receive)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = affinity_key(headers, body)
        request_id = headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        ours = (SESSION_HEADER.encode(), REQUEST_ID_HEADER.encode(), FRONT_HEADER.encode())
        kept = [(k, v) for k, v in scope["headers"] if k.lower().replace(b"_", b"-") not in ours]
        kept += [(REQUEST_ID_HEADER.encode(), request_id.encode()), (FRONT_HEADER.encode(), b"1")]
        if key is not None:
            kept.append((SESSION_HEADER.encode(), key_digest(key).encode()))
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()  # the rest of a long body, then the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": more_body}

        start: dict[str, Any] | None = None
        finished = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal start, finished
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app({**scope, "headers": kept}, replay, tracked)
        finally:
            engine = _routed().pop(request_id, None)
        if not finished:  # the proxy gave up on the engine (it logged why): say so instead of cutting the answer
            await self._fail(send, start, engine)

    async def _read_body(self, receive: Any) -> tuple[bytes, bool]:
        """The body up to the limit (a chunk past it at most), and whether more follows."""
        chunks, size, more = [], 0, True
        while more and size <= self.max_body_bytes:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        return b"".join(chunks), more

    @staticmethod
    async def _fail(send: Any, start: dict[str, Any] | None, engine: str | None) -> None:
        if start is not None:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in start["headers"]}
            error = error_body(503, failure_message(headers.get(REPLICA_HEADER, engine)), code="replica_failed")
            tail = f"data: {json.dumps(error)}\n\n".encode() \
                if headers.get("content-type", "").startswith("text/event-stream") else b""
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            return
        body = json.dumps(error_body(503, failure_message(engine), code="replica_failed")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if engine is not None:
            headers.append((REPLICA_HEADER.encode(), engine.encode()))
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def proxy_middlewares() -> list[Middleware]:
    """What Ray's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``) for the middlewares it runs."""
    return [Middleware(ProxyFront)]


def engine_name(replica: RunningReplica) -> str:
    """The name an engine reported (``EngineReplica.record_replica_metadata``), else its replica id."""
    return replica.replica_metadata.get("name") or replica.replica_id.unique_id


class AffinityRouter(RequestRouter):
    """The engines' request router: rendezvous hashing for requests with a key, fewest ongoing for the others."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        digest = pending_request.metadata.session_id if pending_request is not None else ""
        if not digest:
            return [candidate_replicas]  # Serve takes the one with the shortest queue
        pending_request.routing_context.should_backoff = True  # a full engine is retried after a pause, not spun on
        by_name = {engine_name(r): r for r in candidate_replicas}
        return [[by_name[name]] for name in rendezvous_order(digest, list(by_name))]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        replica, noted = self.curr_replicas.get(replica_id), _routed()
        if replica is not None:
            noted[pending_request.metadata.request_id] = engine_name(replica)
            while len(noted) > MAX_NOTED:
                noted.pop(next(iter(noted)))


def _routed() -> dict[str, str]:
    """``_ROUTED`` of this module as this process imported it: Ray rebuilds the router class from a pickled copy
    whose globals are not the module's, while the proxy imports ``ProxyFront`` from the module itself."""
    return importlib.import_module(__name__)._ROUTED

