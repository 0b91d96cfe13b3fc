"""The OpenAI-compatible HTTP API over a loaded ``Model``, its continuous-batching ``Scheduler`` and,
optionally, a ``ContextStore``.

Routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (JSON or SSE streaming ending with
``data: [DONE]``), ``/v1/embeddings``, ``/v1/context/documents`` (POST), ``/v1/context/documents/{id}``
(DELETE), ``/v1/context/search``, ``/health``, ``/ready``, ``/metrics``. A completion or chat request with
``"context": {"k": 3}`` is answered from the store's best passages and carries ``citations``.

Threads: the scheduler thread alone touches the model; the event loop only tokenizes and formats; the
embedder and the context store run in the thread pool (the store is thread-safe; the embedder is shared by
``/v1/embeddings`` and the store, one call at a time).

>>> from fastapi.testclient import TestClient
>>> from rocmforge import load
>>> model = load("smollm2-135m", device="cpu", n_ctx=512, n_parallel=4)  # doctest: +SKIP
>>> with TestClient(create_app(model, max_batch=4)) as client:  # doctest: +SKIP
...     r = client.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 2,
...                                               "temperature": 0})
>>> r.json()["choices"][0]["text"]  # doctest: +SKIP
' Paris.'
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from context_store.prompt import build_context_prompt
from rocmforge.sampler import SamplingParams
from rocmforge.server.errors import APIError, error_body
from rocmforge.server.metrics import Metrics
from rocmforge.server.middleware import APIKeyAuth, BodyLimit, RequestMetrics
from rocmforge.server.scheduler import (Event, Failed, Finished, GenerationRequest, QueueFull, Scheduler,
                                        TextPiece)
from rocmforge.server.schemas import (ChatRequest, CompletionRequest, DocumentIn, EmbeddingRequest,
                                      SamplingFields)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond these the server answers 400 (413 for the body)."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 4096
    max_messages: int = 256
    max_embedding_inputs: int = 256


class LockedEmbedder:
    """An embedder shared by ``/v1/embeddings`` and the context store, one call at a time.

    MiniLM's tokenizer is one mutable object (``token_spans`` switches its truncation off and on again), so
    concurrent calls from the thread pool must not interleave. Keeps ``name``/``dim`` for the store's checks.
    """

    def __init__(self, inner: Any):
        self.inner, self.name, self.dim = inner, getattr(inner, "name", "custom"), inner.dim
        self._lock = threading.Lock()
        if hasattr(inner, "token_spans"):
            self.token_spans = self._token_spans

    def __call__(self, texts: list[str]) -> np.ndarray:
        with self._lock:
            return self.inner(texts)

    def _token_spans(self, text: str) -> list[tuple[int, int]]:
        with self._lock:
            return self.inner.token_spans(text)

    def embed_with_count(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Vectors and the number of tokens they took (words, for an embedder without a tokenizer)."""
        with self._lock:
            vectors = self.inner(texts)
            encoder = getattr(self.inner, "encoder", None)
            n_tokens = int(encoder.tokenize(texts)[1].sum()) if encoder else sum(len(t.split()) for t in texts)
        return vectors, n_tokens


class _Disconnected:
    """Put on a request's event queue when its client goes away."""


class _Events:
    """One request's scheduler events, handed from the scheduler thread to the event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event | _Disconnected] = asyncio.Queue()

    def put(self, event: Event | _Disconnected) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop closed (server shutting down): nobody is listening any more
            pass


class Server:
    """Route handlers bound to one model, scheduler, embedder and store."""

    def __init__(self, model: Any, scheduler: Scheduler, metrics: Metrics, limits: Limits,
                 embedder: LockedEmbedder | None, store: Any | None):
        self.model, self.scheduler, self.metrics, self.limits = model, scheduler, metrics, limits
        self.embedder, self.store = embedder, store

    # --- plain routes ------------------------------------------------------------------------------------
    async def health(self) -> dict:
        return {"status": "ok"}

    async def ready(self) -> JSONResponse:
        ok = self.scheduler.alive
        return JSONResponse({"status": "ready" if ok else "starting", "model": self.model.name},
                            status_code=200 if ok else 503)

    async def models(self) -> dict:
        names = [self.model.name] + ([self.embedder.name] if self.embedder else [])
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "rocmforge"}
                                           for n in names]}

    async def metrics_text(self) -> PlainTextResponse:
        kv = self.model.kv
        gauges = {
            "rocmforge_queue_depth": (self.scheduler.queue_depth, "Requests waiting for a batch slot."),
            "rocmforge_active_sequences": (self.scheduler.n_running, "Sequences in the running batch."),
            "rocmforge_max_batch": (self.scheduler.max_batch, "Batch slots (--max-batch)."),
            "rocmforge_kv_blocks_free": (kv.n_free_blocks, "Free blocks in the KV cache pool."),
            "rocmforge_kv_blocks_total": (kv.n_blocks, "Blocks in the KV cache pool."),
        }
        return PlainTextResponse(self.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    # --- generation --------------------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request: send a string or a list with one string",
                               param="prompt")
            prompt = prompt[0]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model.name}
        if body.context is not None:
            if not isinstance(prompt, str):
                raise APIError(400, "context needs the prompt as text", param="prompt")
            prompt, head["citations"] = await self._context_prompt(prompt, body)
        ids = self.model.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if any(not 0 <= t < self.model.tokenizer.vocab_size for t in ids):
            raise APIError(400, f"token ids must be in [0, {self.model.tokenizer.vocab_size})", param="prompt")
        return await self._generate(request, body, ids, body.max_tokens, head, chat=False)

    async def chat_completions(self, body: ChatRequest, request: Request) -> Response:
        if len(body.messages) > self.limits.max_messages:
            raise APIError(400, f"{len(body.messages)} messages; the limit is {self.limits.max_messages}",
                           param="messages")
        messages = [m.as_template_message() for m in body.messages]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model.name}
        if body.context is not None:
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if not users:
                raise APIError(400, "context needs a user message to answer", param="messages")
            last = users[-1]
            content, head["citations"] = await self._context_prompt(messages[last]["content"], body)
            messages[last] = {**messages[last], "content": content}
        try:
            prompt = self.model.apply_chat_template(messages)
        except Exception as exc:  # the model's own template refused these messages (e.g. roles out of order)
            raise APIError(400, f"the chat template cannot render these messages: {exc}", param="messages")
        ids = self.model.tokenize(prompt)  # the file's BOS rule, as Model.create_chat_completion
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await self._generate(request, body, ids, max_tokens, head, chat=True)

    async def _context_prompt(self, question: str, body: SamplingFields) -> tuple[str, list[dict]]:
        store = self._require_store()
        hits = await run_in_threadpool(store.search, question, body.context.k, body.context.mode)
        return build_context_prompt(question, hits)

    def _sampling(self, body: SamplingFields) -> SamplingParams:
        if (name := body.unsupported()) is not None:
            raise APIError(400, f"{name} is not supported by this server", param=name)
        vocab = self.model.tokenizer.vocab_size
        if body.logit_bias and not all(0 <= t < vocab for t in body.logit_bias):
            raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab})", param="logit_bias")
        try:
            return SamplingParams(**body.sampling())
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc

    def _max_tokens(self, requested: int | None, n_prompt: int, prompt_field: str) -> int:
        n_ctx = self.model.n_ctx
        if n_prompt >= n_ctx:
            raise APIError(400, f"this model's context is {n_ctx} tokens, but the prompt has {n_prompt} tokens "
                                f"(at most {n_ctx - 1} leave room to generate)",
                           param=prompt_field, code="context_length_exceeded")
        if requested is not None and requested > self.limits.max_tokens:
            raise APIError(400, f"max_tokens is {requested}; this server allows at most {self.limits.max_tokens}",
                           param="max_tokens")
        # Never past the context: a request that asks for more ends with finish_reason "length" there.
        return min(requested or self.limits.max_tokens, n_ctx - n_prompt)

    async def _generate(self, request: Request, body: SamplingFields, ids: list[int], max_tokens: int | None,
                        head: dict, chat: bool) -> Response:
        params = self._sampling(body)
        max_tokens = self._max_tokens(max_tokens, len(ids), "messages" if chat else "prompt")
        events = _Events()
        job = GenerationRequest(ids, params, max_tokens, events.put, stop=body.stops())
        try:
            self.scheduler.submit(job)
        except QueueFull as exc:
            raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after)})
        watcher = asyncio.create_task(self._watch_disconnect(request, job, events))
        streaming = False  # once the StreamingResponse owns the job, its generator cancels it
        try:
            first = await events.queue.get()
            if isinstance(first, Failed):
                raise APIError(500, first.message, code="engine_error")
            if isinstance(first, _Disconnected):
                return Response(status_code=499)
            if body.stream:
                watcher.cancel()  # from here on Starlette's StreamingResponse notices the disconnect
                streaming = True
                return StreamingResponse(self._sse(first, events, job, head, chat), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            text, event = [], first
            while isinstance(event, TextPiece):
                text.append(event.text)
                event = await events.queue.get()
            if isinstance(event, Failed):
                raise APIError(500, event.message, code="engine_error")
            if isinstance(event, _Disconnected):
                return Response(status_code=499)
            return JSONResponse(_final_response(head, "".join(text), event, chat))
        finally:
            watcher.cancel()
            if not streaming and not job.done.is_set():
                self.scheduler.cancel(job)

    async def _watch_disconnect(self, request: Request, job: GenerationRequest, events: _Events) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.scheduler.cancel(job)
        events.put(_Disconnected())

    async def _sse(self, first: Event, events: _Events, job: GenerationRequest, head: dict,
                   chat: bool) -> AsyncIterator[str]:
        """``data: {chunk}`` lines; the last chunk has finish_reason and usage, then ``data: [DONE]``."""
        head = {**head, "object": "chat.completion.chunk"} if chat else head
        try:
            if chat:
                yield _sse_line({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]})
            event = first
            while isinstance(event, TextPiece):
                choice = {"index": 0, "delta": {"content": event.text}} if chat else {"index": 0, "text": event.text}
                yield _sse_line({**head, "choices": [{**choice, "logprobs": None, "finish_reason": None}]})
                event = await events.queue.get()
            if isinstance(event, Finished):
                choice = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
                yield _sse_line({**head, "choices": [{**choice, "logprobs": None, "finish_reason": event.reason}],
                                 "usage": _usage(event)})
                yield "data: [DONE]\n\n"
            elif isinstance(event, Failed):
                yield _sse_line(error_body(500, event.message, code="engine_error"))
        finally:  # the client went away, or we are done: either way the sequence must not keep its blocks
            if not job.done.is_set():
                self.scheduler.cancel(job)

    # --- embeddings and context --------------------------------------------------------------------------
    async def embeddings(self, body: EmbeddingRequest) -> dict:
        if self.embedder is None:
            raise APIError(404, "this server has no embedding model", code="no_embedder")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts or len(texts) > self.limits.max_embedding_inputs:
            raise APIError(400, f"input must hold 1 to {self.limits.max_embedding_inputs} texts", param="input")
        if any(not t for t in texts):
            raise APIError(400, "input texts must not be empty", param="input")
        vectors, n_tokens = await run_in_threadpool(self.embedder.embed_with_count, texts)
        vectors = np.asarray(vectors, dtype=np.float32)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                 if body.encoding_format == "base64" else v.tolist()}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": self.embedder.name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    def _require_store(self) -> Any:
        if self.store is None:
            raise APIError(404, "this server has no context store: start it with --context DB", code="no_context")
        return self.store

    async def add_document(self, body: DocumentIn) -> dict:
        from context_store import ContextStoreError

        store = self._require_store()
        try:
            result = await run_in_threadpool(store.add_text, body.text, body.source, body.metadata, body.collection)
        except ContextStoreError as exc:
            raise APIError(400, str(exc), param="text") from exc
        return {"object": "context.document", "id": result.document_id, "n_chunks": result.n_chunks,
                "skipped": result.skipped}

    async def search(self, q: str = Query(min_length=1), k: int = Query(5, ge=1, le=50),
                     mode: Literal["hybrid", "vector", "keyword"] = "hybrid") -> dict:
        store = self._require_store()
        hits = await run_in_threadpool(store.search, q, k, mode)
        return {"object": "list", "data": [hit.to_dict() for hit in hits]}

    async def delete_document(self, document_id: int) -> dict:
        store = self._require_store()
        if not await run_in_threadpool(store.delete, document_id):
            raise APIError(404, f"no document with id {document_id}", param="document_id")
        return {"object": "context.document", "id": document_id, "deleted": True}


def _usage(done: Finished) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _final_response(head: dict, text: str, done: Finished, chat: bool) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
    return {**head, "choices": [{**choice, "logprobs": None, "finish_reason": done.reason}], "usage": _usage(done)}


def _sse_line(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    field = ".".join(loc) or None
    return (f"{field}: {first['msg']}" if field else first["msg"]), field


def create_app(model: Any, *, max_batch: int = 8, max_queue: int = 64, api_key: str | None = None,
               embedder: Any | None = None, store: Any | None = None, limits: Limits = Limits(),
               chunk_size: int = 64, prefill_budget: int = 64, workers: int = 1) -> FastAPI:
    """The ASGI app. The scheduler thread starts and stops with the app's lifespan.

    ``model`` should be loaded with ``n_parallel=max_batch`` so its KV pool holds every running sequence.
    ``workers``: parallel forwards a large batch is split into (see ``Scheduler``).
    ``embedder`` (texts -> vectors) serves ``/v1/embeddings`` and must be the one ``store`` was opened with.
    """
    metrics = Metrics()
    scheduler = Scheduler(model, max_batch=max_batch, max_queue=max_queue, chunk_size=chunk_size,
                          prefill_budget=prefill_budget, workers=workers, metrics=metrics)
    server = Server(model, scheduler, metrics, limits, embedder, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="rocmforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.get("/health")(server.health)
    app.get("/ready")(server.ready)
    app.get("/metrics")(server.metrics_text)
    app.get("/v1/models")(server.models)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat_completions)
    app.post("/v1/embeddings")(server.embeddings)
    app.post("/v1/context/documents")(server.add_document)
    app.get("/v1/context/search")(server.search)
    app.delete("/v1/context/documents/{document_id}")(server.delete_document)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s", request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(APIKeyAuth, api_key=api_key)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
