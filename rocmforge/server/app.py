"""The OpenAI-compatible HTTP API over a loaded ``Model``, its continuous-batching ``Scheduler`` and,
optionally, a ``ContextStore``.

Routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (JSON or SSE streaming ending with
``data: [DONE]``; ``logprobs``, ``echo``, ``n``, ``response_format``/``json_schema``/``grammar``, ``tools``),
``/tokenize``, ``/detokenize``, ``/tokenizer_info`` (vLLM's, for lm-evaluation-harness), ``/v1/embeddings``, ``/v1/context/documents`` (POST), ``/v1/context/documents/{id}``
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
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from context_store.prompt import build_context_prompt
from rocmforge.constraints import Constraint, Grammar, GrammarError, grammar_from
from rocmforge.logprobs import TokenLogprob, chat_logprobs, completion_logprobs
from rocmforge.sampler import SamplingParams
from rocmforge.server.errors import APIError, error_body
from rocmforge.server.metrics import Metrics
from rocmforge.server.middleware import APIKeyAuth, BodyLimit, RequestMetrics
from rocmforge.server.scheduler import (Event, Failed, Finished, GenerationRequest, PromptScored, QueueFull,
                                        Scheduler, TextPiece)
from rocmforge.server.schemas import (ChatRequest, CompletionRequest, DetokenizeRequest, DocumentIn,
                                      EmbeddingRequest, SamplingFields, TokenizeRequest)
from rocmforge.tools import OfferedTools, assistant_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond these the server answers 400 (413 for the body)."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 4096
    max_messages: int = 256
    max_embedding_inputs: int = 256
    max_choices: int = 16  # prompts x n in one request


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
        self.queue: asyncio.Queue[tuple[int, Event] | _Disconnected] = asyncio.Queue()

    def put(self, event: tuple[int, Event] | _Disconnected) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop closed (server shutting down): nobody is listening any more
            pass

    def put_choice(self, index: int, event: Event) -> None:
        self.put((index, event))


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

    # --- tokens (the endpoints lm-evaluation-harness's "remote" tokenizer and vLLM clients use) -----------------
    async def tokenize(self, body: TokenizeRequest) -> dict:
        ids = self.model.tokenize(body.prompt, add_bos=None if body.add_special_tokens else False)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.model.n_ctx}

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        self._check_ids(body.tokens, "tokens")
        return {"prompt": self.model.detokenize(body.tokens)}

    async def tokenizer_info(self) -> dict:
        tok = self.model.tokenizer
        text = lambda i: tok.token_text(i) if i is not None else None  # noqa: E731
        return {"eos_token": text(tok.eos_id), "bos_token": text(tok.bos_id), "pad_token": None,
                "chat_template": tok.chat_template, "model_max_length": self.model.n_ctx}

    def _check_ids(self, ids: list[int], param: str) -> None:
        if any(not 0 <= t < self.model.tokenizer.vocab_size for t in ids):
            raise APIError(400, f"token ids must be in [0, {self.model.tokenizer.vocab_size})", param=param)

    # --- generation --------------------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        prompts = body.prompt
        if isinstance(prompts, str) or not prompts or isinstance(prompts[0], int):
            prompts = [prompts]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model.name}
        if body.context is not None:
            if len(prompts) != 1 or not isinstance(prompts[0], str):
                raise APIError(400, "context needs one prompt as text", param="prompt")
            text, head["citations"] = await self._context_prompt(prompts[0], body)
            prompts = [text]
        jobs = []
        for prompt in prompts:
            ids = self.model.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            self._check_ids(ids, "prompt")
            echo = (prompt if isinstance(prompt, str) else self.model.detokenize(ids)) if body.echo else ""
            jobs.append((ids, echo))
        try:
            grammar = grammar_from(body.json_schema, body.grammar, body.response_format)
        except GrammarError as exc:
            raise APIError(400, str(exc), param="grammar" if body.grammar else "response_format") from None
        return await self._generate(request, body, jobs, body.max_tokens, head, grammar, None, body.logprobs,
                                    score_prompt=body.echo and body.logprobs is not None)

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
        response_format = body.response_format
        if body.json_schema is not None and response_format is None:
            response_format = {"type": "json_schema", "json_schema": {"schema": body.json_schema}}
        try:
            prompt, grammar, tools = self.model.chat_prompt(messages, body.tools, body.tool_choice, response_format,
                                                            body.grammar)
        except GrammarError as exc:
            raise APIError(400, str(exc), param="tools" if body.tools else "response_format") from None
        except Exception as exc:  # the model's own template refused these messages (e.g. roles out of order)
            raise APIError(400, f"the chat template cannot render these messages: {exc}", param="messages")
        ids = self.model.tokenize(prompt)  # the file's BOS rule, as Model.create_chat_completion
        max_tokens = body.max_completion_tokens or body.max_tokens
        n_top = (body.top_logprobs or 0) if body.logprobs else None
        return await self._generate(request, body, [(ids, "")], max_tokens, head, grammar, tools, n_top,
                                    score_prompt=False, chat=True)

    async def _context_prompt(self, question: str, body: SamplingFields) -> tuple[str, list[dict]]:
        store = self._require_store()
        hits = await run_in_threadpool(store.search, question, body.context.k, body.context.mode)
        return build_context_prompt(question, hits)

    def _constraint(self, grammar: Grammar | None) -> Constraint | None:
        if grammar is None:
            return None
        try:
            return Constraint(self.model.tokenizer, grammar)
        except GrammarError as exc:
            raise APIError(400, str(exc), param="grammar" if grammar.source == "grammar" else "response_format")

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

    async def _generate(self, request: Request, body: SamplingFields, prompts: list[tuple[list[int], str]],
                        max_tokens: int | None, head: dict, grammar: Grammar | None, tools: OfferedTools | None,
                        n_top: int | None, score_prompt: bool, chat: bool = False) -> Response:
        """Run ``body.n`` choices of each prompt (choice ``p * n + j``; the first of a prompt runs it, the others
        read its KV blocks) and answer with all of them, as JSON or as one SSE stream."""
        params = self._sampling(body)
        if len(prompts) * body.n > self.limits.max_choices:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} choices; the limit is {self.limits.max_choices}",
                           param="n")
        events = _Events()
        choices: list[_Choice] = []
        for ids, echo in prompts:
            limit = self._max_tokens(max_tokens, len(ids), "messages" if chat else "prompt")
            first: GenerationRequest | None = None
            for j in range(body.n):
                index = len(choices)
                seeded = replace(params, seed=params.seed + j) if params.seed is not None and j else params
                job = GenerationRequest(ids, seeded, limit, partial(events.put_choice, index), stop=body.stops(),
                                        logprobs=n_top, score_prompt=score_prompt,
                                        constraint=self._constraint(grammar), share_prompt_of=first)
                first = first or job
                choices.append(_Choice(index, job, ids, echo))
        try:
            for choice in choices:
                self.scheduler.submit(choice.job)
        except QueueFull as exc:
            for choice in choices:
                self.scheduler.cancel(choice.job)
            raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after)})
        jobs = [c.job for c in choices]
        watcher = asyncio.create_task(self._watch_disconnect(request, jobs, events))
        streaming = False  # once the StreamingResponse owns the jobs, its generator cancels them
        answer = _Answer(self.model.tokenizer, head, choices, chat, tools, n_top)
        try:
            first_event = await events.queue.get()
            if isinstance(first_event, _Disconnected):
                return Response(status_code=499)
            if isinstance(first_event[1], Failed):
                raise APIError(500, first_event[1].message, code="engine_error")
            if body.stream:
                watcher.cancel()  # from here on Starlette's StreamingResponse notices the disconnect
                streaming = True
                return StreamingResponse(self._sse(first_event, events, jobs, answer), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            item = first_event
            while True:
                if isinstance(item, _Disconnected):
                    return Response(status_code=499)
                if isinstance(item[1], Failed):
                    raise APIError(500, item[1].message, code="engine_error")
                answer.take(*item)
                if answer.done:
                    return JSONResponse(answer.final())
                item = await events.queue.get()
        finally:
            watcher.cancel()
            if not streaming:
                self._cancel_unfinished(jobs)

    def _cancel_unfinished(self, jobs: list[GenerationRequest]) -> None:
        for job in jobs:
            if not job.done.is_set():
                self.scheduler.cancel(job)

    async def _watch_disconnect(self, request: Request, jobs: list[GenerationRequest], events: _Events) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self._cancel_unfinished(jobs)
        events.put(_Disconnected())

    async def _sse(self, first: tuple[int, Event], events: _Events, jobs: list[GenerationRequest],
                   answer: _Answer) -> AsyncIterator[str]:
        """``data: {chunk}`` lines; each choice's last chunk has its finish_reason (the very last one the usage),
        then ``data: [DONE]``. The lines of every event already waiting go out as one write: a token's chunk with
        the finish and ``[DONE]`` that follow it, or the tokens that queued while the loop was busy (each write
        is a message through Ray Serve's proxy under ``serve --replicas``)."""
        try:
            lines = [_sse_line(chunk) for chunk in answer.opening_chunks()]
            item: tuple[int, Event] | _Disconnected = first
            while True:
                end = False
                while True:
                    if isinstance(item, _Disconnected):
                        return
                    if isinstance(item[1], Failed):
                        lines.append(_sse_line(error_body(500, item[1].message, code="engine_error")))
                        end = True
                    else:
                        lines += [_sse_line(chunk) for chunk in answer.take(*item)]
                        if answer.done:
                            lines.append("data: [DONE]\n\n")
                            end = True
                    if end or events.queue.empty():
                        break
                    item = events.queue.get_nowait()
                if lines:
                    yield "".join(lines)
                    lines = []
                if end:
                    return
                item = await events.queue.get()
        finally:  # the client went away, or we are done: either way no sequence may keep its blocks
            self._cancel_unfinished(jobs)

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


@dataclass
class _Choice:
    """One choice of a request, filled from its scheduler events."""

    index: int
    job: GenerationRequest
    prompt_ids: list[int]
    echo: str
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    finished: Finished | None = None


class _Answer:
    """Turns the choices' events into OpenAI's shapes: chunks as they come (``take``) and the whole answer."""

    def __init__(self, tokenizer: Any, head: dict, choices: list[_Choice], chat: bool, tools: OfferedTools | None,
                 n_top: int | None):
        self.tokenizer, self.choices, self.chat, self.tools, self.n_top = tokenizer, choices, chat, tools, n_top
        self.head = {**head, "object": "chat.completion.chunk"} if chat else head
        self.final_head = head
        self.n_open = len(choices)

    @property
    def done(self) -> bool:
        return self.n_open == 0

    def _logprobs(self, entries: Sequence[TokenLogprob | int], offset: int = 0) -> dict | None:
        if self.n_top is None:
            return None
        if self.chat:
            return chat_logprobs(self.tokenizer, entries)
        return completion_logprobs(self.tokenizer, entries, offset)

    def _chunk(self, choice: _Choice, text: str | None, entries: Sequence, finish: str | None,
               delta: dict | None = None) -> dict:
        if self.chat:
            body = {"delta": delta if delta is not None else ({"content": text} if text else {})}
        else:
            body = {"text": text or ""}
        return {**self.head, "choices": [{"index": choice.index, **body, "logprobs": self._logprobs(entries),
                                          "finish_reason": finish}]}

    def opening_chunks(self) -> list[dict]:
        """Chat: each choice's role. Completions that echo without log-probabilities: each prompt's text."""
        if self.chat:
            return [self._chunk(c, None, [], None, {"role": "assistant", "content": ""}) for c in self.choices]
        if self.n_top is None:
            return [self._chunk(c, c.echo, [], None) for c in self.choices if c.echo]
        return []

    def take(self, index: int, event: Event) -> list[dict]:
        """Record ``event`` of choice ``index``; returns the chunks it makes."""
        choice = self.choices[index]
        if isinstance(event, PromptScored):
            choice.prompt_logprobs = event.logprobs
            return [self._chunk(choice, choice.echo, [choice.prompt_ids[0], *event.logprobs], None)] \
                if choice.echo else []
        if isinstance(event, TextPiece):
            choice.text.append(event.text)
            choice.logprobs += event.logprobs
            if self.tools:  # a tool call is known only whole: its text waits for the end
                return []
            return [self._chunk(choice, event.text, event.logprobs, None)]
        choice.finished, self.n_open = event, self.n_open - 1
        choice.logprobs += event.logprobs
        delta, finish = None, event.reason
        if self.tools:
            message, finish = assistant_message("".join(choice.text), event.reason, self.tools)
            delta = {"content": message["content"]} if message["content"] else {}
            if "tool_calls" in message:
                delta["tool_calls"] = [{"index": j, **call} for j, call in enumerate(message["tool_calls"])]
        chunk = self._chunk(choice, "", event.logprobs, finish, delta)
        return [{**chunk, "usage": self.usage()} if self.done else chunk]

    def usage(self) -> dict[str, int]:
        prompts = {id(c.job.share_prompt_of or c.job): len(c.prompt_ids) for c in self.choices}
        completion = sum(c.finished.completion_tokens for c in self.choices if c.finished is not None)
        prompt = sum(prompts.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def final(self) -> dict:
        out = []
        for c in self.choices:
            text = "".join(c.text)
            if self.chat:
                message, finish = assistant_message(text, c.finished.reason, self.tools)
                out.append({"index": c.index, "message": message, "logprobs": self._logprobs(c.logprobs),
                            "finish_reason": finish})
                continue
            scored: list = [c.prompt_ids[0], *c.prompt_logprobs] if c.echo and c.prompt_logprobs is not None else []
            logprobs = self._logprobs(scored + c.logprobs, 0 if c.echo else len(self.tokenizer.decode(c.prompt_ids)))
            out.append({"index": c.index, "text": c.echo + text, "logprobs": logprobs,
                        "finish_reason": c.finished.reason})
        return {**self.final_head, "choices": out, "usage": self.usage()}


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
    app.post("/tokenize")(server.tokenize)
    app.post("/detokenize")(server.detokenize)
    app.get("/tokenizer_info")(server.tokenizer_info)
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
