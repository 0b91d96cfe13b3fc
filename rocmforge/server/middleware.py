"""Three small ASGI middlewares, outermost first: count every response for ``/metrics``, check the API key,
cap the request body. Written against raw ASGI (not ``BaseHTTPMiddleware``) so streaming responses and
client-disconnect detection pass through untouched.
"""
from __future__ import annotations

import json
import secrets
from typing import Any

from rocmforge.server.errors import error_body
from rocmforge.server.metrics import Metrics

Scope = dict[str, Any]
ASGIApp = Any


async def _send_error(send: Any, status: int, message: str, code: str | None = None,
                      headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Counts responses by route template (``/v1/context/documents/{document_id}``, not each id) and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def counting_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = scope.get("route")
            self.metrics.count_request(getattr(route, "path", "unmatched"), status)


class APIKeyAuth:
    """With a key set, every path but the open ones needs ``Authorization: Bearer KEY`` (else 401)."""

    def __init__(self, app: ASGIApp, api_key: str | None, open_paths: frozenset[str] = frozenset({"/health"})):
        self.app, self.api_key, self.open_paths = app, api_key, open_paths

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.api_key is None or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            await _send_error(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses bodies over ``max_bytes`` with 413, whether announced by Content-Length or sent chunked.

    A chunked body is read up to the limit before the route runs and then replayed; later ``receive``
    calls go to the server, so the route still sees the client disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit():
            if int(length) > self.max_bytes:
                return await _send_error(send, 413, f"request body is {int(length)} bytes; the limit is "
                                                    f"{self.max_bytes}", code="body_too_large")
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _send_error(send, 413, f"request body is over the limit of {self.max_bytes} bytes",
                                         code="body_too_large")
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
