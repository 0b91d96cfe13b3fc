"""Continuous batching: one thread owns the model and advances every running sequence with one batched forward
per tick.

A tick is a token boundary. Each tick the scheduler
1. drops cancelled requests (a client went away) and gives their KV blocks back;
2. admits waiting requests while fewer than ``max_batch`` run;
3. builds ONE batch: the last sampled token of every decoding sequence, plus the next prompt chunk of
   prefilling sequences (at most ``prefill_budget`` prompt tokens per tick), so a long prompt delays the
   running streams by one chunk, not by its whole length;
4. runs the architecture's ``forward`` over it: every layer multiplies ``[n_tokens, d]`` matrices over the
   shared paged KV pool (attention reads each sequence's own blocks). With ``workers`` > 1 a large batch is
   cut into that many contiguous groups run as parallel forwards, each on one BLAS thread (on 2 shared cores
   that beat one forward on 2 OpenBLAS threads, which stalls whenever another process takes a core);
5. samples each sequence's next token with its own ``Sampler`` (its own seeded generator), streams the new
   text, and finishes (and frees the blocks of) those that hit an end token, a stop string or their limit.

On a GPU backend the tick's plain decode rows (one token, no logprobs) skip steps 4–5: they run as one replayed
graph per batch-size bucket that also samples on the device (``GpuBackend.graph_step_batch``; a grammar's mask is
uploaded while the forward runs and applied there), and only their token ids come back; prompt chunks and the other rows run through ``forward`` in the same tick.

Prompts are cut at fixed multiples of ``chunk_size`` whatever else is running, so a sequence's forward sees the
same shapes alone or batched; with ``batch_invariant.BatchInvariantCpuBackend`` the text is then identical.

Events reach the request's owner through ``request.emit`` (called on the scheduler thread): ``TextPiece``
zero or more times, then exactly one ``Finished`` or ``Failed``.

>>> from rocmforge import load
>>> from rocmforge.sampler import SamplingParams
>>> model = load("smollm2-135m", device="cpu", n_ctx=256, n_parallel=4)  # doctest: +SKIP
>>> scheduler = Scheduler(model, max_batch=4); scheduler.start()  # doctest: +SKIP
>>> events = []
>>> request = GenerationRequest(model.tokenize("The capital of France is"), SamplingParams(temperature=0),
...                             max_tokens=2, emit=events.append)  # doctest: +SKIP
>>> scheduler.submit(request); request.done.wait(60); scheduler.stop()  # doctest: +SKIP
>>> "".join(e.text for e in events if isinstance(e, TextPiece))  # doctest: +SKIP
' Paris.'
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rocmforge.constraints import Constraint, masks_during
from rocmforge.logprobs import TokenLogprob, score, score_rows
from rocmforge.sampler import Sampler, SamplingParams, StopMatcher
from rocmforge.server.metrics import Metrics

log = logging.getLogger(__name__)


# --- what flows in and out ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextPiece:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()   # the tokens sampled since the last piece (when asked for)


@dataclass(frozen=True)
class PromptScored:
    logprobs: tuple[TokenLogprob, ...]        # the prompt's tokens from the second on (``score_prompt``)


@dataclass(frozen=True)
class Finished:
    reason: str               # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()   # sampled tokens no piece carried (an end token, held-back text)


@dataclass(frozen=True)
class Failed:
    message: str              # the engine raised; the request is over, the server is not


Event = TextPiece | PromptScored | Finished | Failed


@dataclass
class GenerationRequest:
    """One completion to run. ``emit`` is called from the scheduler thread; it must not block.

    ``logprobs``: report each sampled token's log-probability with that many alternatives (None: none);
    ``score_prompt``: emit ``PromptScored`` once the prompt has run. ``constraint``: a grammar the text must
    follow. ``share_prompt_of``: an earlier request of the same prompt (``n`` > 1): this one waits for its
    prefill and reads its KV blocks instead of running the prompt again.
    """

    prompt_ids: Sequence[int]
    params: SamplingParams
    max_tokens: int
    emit: Callable[[Event], None]
    stop: Sequence[str] = ()
    logprobs: int | None = None
    score_prompt: bool = False
    constraint: Constraint | None = None
    share_prompt_of: GenerationRequest | None = None
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class QueueFull(Exception):
    """Every batch slot and queue place is taken; ``retry_after`` is a hint in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: all batch slots and queue places are taken; retry in {retry_after} s")
        self.retry_after = retry_after


# --- one running sequence ----------------------------------------------------------------------------------
class _Sequence:
    def __init__(self, request: GenerationRequest, model: Any, leader: _Sequence | None = None):
        self.request = request
        self.leader = leader               # the sequence whose prompt blocks this one will read, until forked
        self.seq_id: int | None = model.kv.new_sequence() if leader is None else None
        self.tokens: list[int] = [int(t) for t in request.prompt_ids]
        self.n_prompt = len(self.tokens)
        self.fed = 0                       # tokens already written to the KV cache
        self.sampler = Sampler(request.params)
        self.stops = StopMatcher(request.stop)
        self.decoder = model.tokenizer.incremental_decoder()
        self.finish_reason: str | None = None
        self.scores_prompt = request.score_prompt  # this sequence runs (and so scores) its own prompt
        self.prompt_logprobs: list[TokenLogprob] = []
        self.unsent_logprobs: list[TokenLogprob] = []

    @property
    def prefilling(self) -> bool:
        return self.fed < self.n_prompt

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    def next_input(self, chunk_size: int) -> list[int]:
        """The tokens this sequence feeds in the next forward: a prompt chunk, or its last sampled token."""
        if self.prefilling:
            chunk_end = min((self.fed // chunk_size + 1) * chunk_size, self.n_prompt)
            return self.tokens[self.fed:chunk_end]
        return self.tokens[self.fed:]


class Scheduler:
    """Runs ``GenerationRequest``s on ``model`` with continuous batching (see the module docstring).

    ``max_batch``: sequences in flight at once (the model's KV pool must hold that many full contexts:
    load it with ``n_parallel=max_batch``). ``max_queue``: requests allowed to wait beyond those;
    ``submit`` raises ``QueueFull`` past it.
    """

    def __init__(self, model: Any, max_batch: int = 8, max_queue: int = 64, chunk_size: int = 64,
                 prefill_budget: int = 64, workers: int = 1, min_rows_per_worker: int = 16,
                 metrics: Metrics | None = None):
        if min(max_batch, chunk_size, prefill_budget, workers, min_rows_per_worker) < 1 or max_queue < 0:
            raise ValueError("max_batch, chunk_size, prefill_budget and workers must be >= 1, max_queue >= 0")
        self.model = model
        self.workers, self.min_rows_per_worker = workers, min_rows_per_worker
        self._pool = futures.ThreadPoolExecutor(workers - 1, "rocmforge-forward") if workers > 1 else None
        self.max_batch, self.max_queue = max_batch, max_queue
        self.chunk_size, self.prefill_budget = chunk_size, prefill_budget
        self.metrics = metrics or Metrics()
        self._waiting: deque[GenerationRequest] = deque()
        self._running: list[_Sequence] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.ticks = 0

    # --- called from other threads -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="rocmforge-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current tick; requests still waiting or running get ``Failed``."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; it joins the running batch at the next token boundary with a free slot."""
        with self._wake:
            if self._stopping:
                raise QueueFull(retry_after=5)
            if len(self._waiting) + len(self._running) >= self.max_batch + self.max_queue:
                raise QueueFull(retry_after=1 + len(self._waiting) // self.max_batch)
            self._waiting.append(request)
            self._wake.notify()

    def cancel(self, request: GenerationRequest) -> None:
        """Drop a request (waiting or running); its KV blocks are freed at the next token boundary."""
        with self._wake:
            request.cancelled = True
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def n_running(self) -> int:
        return len(self._running)

    # --- the scheduler thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._running):
                    self._wake.wait()
                if self._stopping:
                    break
                self._drop_cancelled()
                self._admit()
            if self._running:
                self._tick()
        for seq in list(self._running):
            self._fail(seq, "the server is shutting down")
        while self._waiting:
            request = self._waiting.popleft()
            request.emit(Failed("the server is shutting down"))
            request.done.set()

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(request)
            request.done.set()
        for seq in [s for s in self._running if s.request.cancelled]:
            self._release(seq)

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch:
            request = self._waiting.popleft()
            if len(request.prompt_ids) == 0 or len(request.prompt_ids) >= self.model.n_ctx:
                request.emit(Failed(f"prompt has {len(request.prompt_ids)} tokens; it needs 1 to "
                                    f"{self.model.n_ctx - 1} for a context of {self.model.n_ctx}"))
                request.done.set()
                continue
            leader = next((s for s in self._running if s.request is request.share_prompt_of), None) \
                if request.share_prompt_of is not None else None
            self._running.append(_Sequence(request, self.model, leader))

    def _plan(self) -> tuple[list[_Sequence], list[list[int]]]:
        """Which sequences feed which tokens this tick: every decoding one, prompt chunks within the budget."""
        members, inputs, prefill_tokens = [], [], 0
        for seq in self._running:
            if seq.leader is not None:
                continue  # waits for its leader's prompt
            tokens = seq.next_input(self.chunk_size)
            if seq.prefilling:
                if prefill_tokens and prefill_tokens + len(tokens) > self.prefill_budget:
                    continue  # waits a tick; running streams go first
                prefill_tokens += len(tokens)
            members.append(seq)
            inputs.append(tokens)
        return members, inputs

    def _tick(self) -> None:
        members, inputs = self._plan()
        try:
            members, inputs = self._decode_on_device(members, inputs)
        except Exception as exc:  # as below: the rows it ran end, the server goes on
            log.exception("device decode step failed")
            self.metrics.count_engine_error()
            for seq in members:
                self._fail(seq, f"the engine failed: {type(exc).__name__}: {exc}")
            return
        if not members:
            return
        # the masks of constrained sequences that sample this tick are computed while the forward runs
        constraints = [seq.request.constraint if seq.fed + len(tokens) >= seq.n_prompt else None
                       for seq, tokens in zip(members, inputs)]
        result: list = []
        try:
            masks = masks_during(constraints, lambda: result.extend(self._forward(members, inputs)))
            logits = result
        except Exception as exc:  # an engine failure ends this batch's requests, never the server
            log.exception("forward pass failed")
            self.metrics.count_engine_error()
            for seq in members:
                self._fail(seq, f"the engine failed: {type(exc).__name__}: {exc}")
            return
        self.ticks += 1
        self.metrics.observe_batch(len(members))
        for seq, rows, start in logits:
            if seq.scores_prompt and start < seq.n_prompt:
                self._score_prompt(seq, rows, start)
        self._fork_followers()  # before _advance: a leader that finishes now frees its blocks
        mask_of = {id(seq): mask for seq, mask in zip(members, masks)}
        for seq, rows, _ in logits:
            if not seq.prefilling:
                self._advance(seq, rows[-1], mask_of.get(id(seq)))

    def _decode_on_device(self, members: list[_Sequence],
                          inputs: list[list[int]]) -> tuple[list[_Sequence], list[list[int]]]:
        """On a backend with ``graph_step_batch`` (the GPU), run this tick's plain decode rows — one token, no
        logprobs, sampling the device takes — as one replayed graph that samples on the device, grammar masks
        included (computed while the device runs the forward; only token ids come back), and advance them; returns the members and inputs left for ``_forward``.
        Requests join and leave between ticks: the graph of each batch-size bucket is captured once."""
        ops, model = self.model.ops, self.model
        if not hasattr(ops, "graph_step_batch") or model.ctx.hooks.active:
            return members, inputs
        chosen, rows = [], []
        for seq, tokens in zip(members, inputs):
            request = seq.request
            if seq.prefilling or len(tokens) != 1 or request.logprobs is not None:
                continue
            row = seq.sampler.device_row(seq.tokens, model.cfg.vocab_size, ops.device_sampling_capacity)
            if row is not None and len(chosen) < ops.max_batch_rows:
                chosen.append(seq)
                rows.append(seq.sampler.draw(row))
        if not chosen:
            return members, inputs
        batch = model.kv.prepare([(seq.seq_id, seq.tokens[seq.fed:]) for seq in chosen])
        constraints = [seq.request.constraint for seq in chosen]

        def masks() -> list[np.ndarray | None]:  # called while the device runs the forward
            return [c.mask() if c is not None else None for c in constraints]

        tokens = ops.graph_step_batch(batch, lambda b: model.arch.forward(model.ctx, b, rows=b.last_rows),
                                      model.kv, rows, masks if any(c is not None for c in constraints) else None)
        self.ticks += 1
        self.metrics.observe_batch(len(chosen))
        for seq, constraint, token in zip(chosen, constraints, tokens.tolist()):
            seq.fed += 1
            if token < 0:
                self._fail(seq, "every token is banned (all logits are -inf after logit_bias and the grammar's mask)")
                continue
            if constraint is not None:
                try:
                    constraint.accept(token)
                except ValueError as exc:
                    self._fail(seq, str(exc))
                    continue
            self._accept(seq, token)
        ran = {id(seq) for seq in chosen}
        left = [(seq, tokens) for seq, tokens in zip(members, inputs) if id(seq) not in ran]
        return [seq for seq, _ in left], [tokens for _, tokens in left]

    def _score_prompt(self, seq: _Sequence, rows: np.ndarray, start: int) -> None:
        """Log-probabilities of the prompt tokens this chunk's rows predict (row i: token ``start + i + 1``)."""
        stop = min(start + len(rows), seq.n_prompt - 1)
        seq.prompt_logprobs += score_rows(rows[:stop - start], seq.tokens[start + 1:stop + 1],
                                          seq.request.logprobs or 0)
        if not seq.prefilling:
            seq.request.emit(PromptScored(tuple(seq.prompt_logprobs)))

    def _fork_followers(self) -> None:
        """Sequences waiting for a leader's prompt read its whole blocks from now on and run only the rest."""
        for seq in self._running:
            leader = seq.leader
            if leader is not None and not leader.prefilling:
                seq.seq_id, seq.leader = self.model.kv.fork(leader.seq_id, seq.n_prompt - 1), None
                seq.fed = self.model.kv.length(seq.seq_id)
                if seq.scores_prompt:
                    seq.scores_prompt, seq.prompt_logprobs = False, list(leader.prompt_logprobs)
                    seq.request.emit(PromptScored(tuple(seq.prompt_logprobs)))

    def _forward(self, members: list[_Sequence],
                 inputs: list[list[int]]) -> list[tuple[_Sequence, np.ndarray, int]]:
        """Run this tick's tokens as up to ``workers`` forwards in parallel (each a contiguous group of
        sequences); returns (sequence, logits rows, position of the chunk's first token) for every sequence
        past its prompt (its last row) or scoring its prompt (every row)."""
        model = self.model
        groups = _split(list(zip(members, inputs)), self.workers, self.min_rows_per_worker)
        batches = [model.kv.prepare([(seq.seq_id, tokens) for seq, tokens in group]) for group in groups]
        for seq, tokens in zip(members, inputs):
            seq.fed += len(tokens)

        def run(group: list[tuple[_Sequence, list[int]]], batch: Any) -> list[tuple[_Sequence, np.ndarray, int]]:
            wanted, rows = [], []
            for (seq, tokens), seg in zip(group, batch.segments):
                start = seq.fed - len(tokens)
                if seq.scores_prompt and start < seq.n_prompt:
                    picked = range(seg.rows.start, seg.rows.stop)
                elif not seq.prefilling:
                    picked = range(seg.rows.stop - 1, seg.rows.stop)
                else:
                    continue
                wanted.append((seq, len(picked), start))
                rows.extend(picked)
            if not wanted:  # prompt chunks only: no logits wanted, but their keys and values must reach the cache
                model.arch.forward(model.ctx, batch, rows=np.array([batch.n_tokens - 1], dtype=np.int64))
                return []
            logits = model.ops.to_host(model.arch.forward(model.ctx, batch, rows=np.array(rows, dtype=np.int64)))
            out, at = [], 0
            for seq, n_rows, start in wanted:
                out.append((seq, logits[at:at + n_rows], start))
                at += n_rows
            return out

        others = [self._pool.submit(run, group, batch) for group, batch in zip(groups[1:], batches[1:])]
        try:
            out = run(groups[0], batches[0])
        finally:
            futures.wait(others)  # they write to the cache: never free blocks under a running forward
        for future in others:
            out += future.result()
        return out

    def _advance(self, seq: _Sequence, logits: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Sample one token for ``seq`` from its logits (under ``mask``, its constraint's mask), then ``_accept``
        it."""
        request, constraint = seq.request, seq.request.constraint
        if constraint is not None and mask is None:
            mask = constraint.mask()
        try:
            token = seq.sampler.sample(logits, seq.tokens, mask)
            if constraint is not None:
                constraint.accept(token)
        except ValueError as exc:  # e.g. logit_bias banned every token
            self._fail(seq, str(exc))
            return
        if request.logprobs is not None:
            seq.unsent_logprobs.append(score(logits, token, request.logprobs))
        self._accept(seq, token)

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Append the sampled ``token``, stream its text, and finish the sequence if it is done."""
        request, constraint = seq.request, seq.request.constraint
        seq.tokens.append(token)
        if seq.n_generated == 1:
            self.metrics.observe_ttft(time.perf_counter() - request.arrived)
        if token in self.model.tokenizer.eot_ids:
            seq.finish_reason = "stop"
        else:
            text, stopped = seq.stops.feed(seq.decoder.feed(token))
            if text:
                request.emit(TextPiece(text, self._take_logprobs(seq)))
            if stopped or constraint is not None and constraint.done:
                seq.finish_reason = "stop"
        if seq.finish_reason is None and (seq.n_generated >= request.max_tokens
                                          or len(seq.tokens) >= self.model.n_ctx):
            seq.finish_reason = "length"  # at n_ctx the sampled token has no cache slot to run in
        if seq.finish_reason is not None:
            self._finish(seq)

    @staticmethod
    def _take_logprobs(seq: _Sequence) -> tuple[TokenLogprob, ...]:
        taken = tuple(seq.unsent_logprobs)
        seq.unsent_logprobs.clear()
        return taken

    def _finish(self, seq: _Sequence) -> None:
        if seq.stops.matched is None:
            rest = seq.stops.feed(seq.decoder.flush())[0] + seq.stops.flush()
            if rest:
                seq.request.emit(TextPiece(rest, self._take_logprobs(seq)))
        # like llama-cpp-python (and Model.create_completion), the end token that stopped it is not counted
        completion = seq.n_generated - (seq.tokens[-1] in self.model.tokenizer.eot_ids)
        self.metrics.add_tokens(seq.n_prompt, completion)
        self._release(seq, Finished(seq.finish_reason or "stop", seq.n_prompt, completion,
                                    self._take_logprobs(seq)))

    def _fail(self, seq: _Sequence, message: str) -> None:
        self._release(seq, Failed(message))

    def _release(self, seq: _Sequence, last: Event | None = None) -> None:
        """Free the sequence's blocks, then emit its last event: whoever sees the end also sees them free."""
        if seq.seq_id is not None:
            self.model.kv.free(seq.seq_id)
        with self._wake:
            self._running.remove(seq)
            for follower in self._running:  # never forked: it runs its own prompt after all
                if follower.leader is seq:
                    follower.leader, follower.seq_id = None, self.model.kv.new_sequence()
        if last is not None:
            seq.request.emit(last)
        seq.request.done.set()

def _split(items: list[tuple[_Sequence, list[int]]], workers: int,
           min_rows: int) -> list[list[tuple[_Sequence, list[int]]]]:
    """Contiguous groups with about equal token counts: as many as ``workers``, but none under ``min_rows``
    tokens (a forward of fewer rows costs as much as one of ``min_rows``: the batch-invariant backend pads to
    16-row tiles, so smaller groups only add work)."""
    total = sum(len(tokens) for _, tokens in items)
    n_groups = max(1, min(workers, -(-total // min_rows), len(items)))
    groups: list[list[tuple[_Sequence, list[int]]]] = [[]]
    done = 0
    for item in items:
        if groups[-1] and len(groups) < n_groups and done >= total * len(groups) / n_groups:
            groups.append([])
        groups[-1].append(item)
        done += len(item[1])
    return groups
