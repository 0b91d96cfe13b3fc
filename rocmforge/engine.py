"""Generation one step at a time: prefill, decode steps, and single layers in between.

A ``Generation`` is one sequence in the model's KV cache. Tokens are sampled lazily: ``step()`` first runs the
forward of any token that is not in the cache yet (the prompt, or the token sampled last), then samples the next
token from the logits. ``step_layer()`` runs that same pending forward one layer at a time, so a notebook can look
at ``gen.state`` (the residual stream, the layer about to run) between layers. ``step_all`` advances several
generations with ONE batched forward: what the server's continuous batching calls each tick.
On a GPU, when every sequence decodes one token (no logprobs) and no hook is registered, that tick is a replayed
graph that also samples on the device (``GpuBackend.graph_step_batch``), grammar masks included: only token ids come
back, so ``gen.logits`` is None after such a step (hooks, or ``step_all_forward``, keep the logits).

>>> from rocmforge import load
>>> model = load("smollm2-135m")  # doctest: +SKIP
>>> gen = model.start("The capital of France is", temperature=0)  # doctest: +SKIP
>>> gen.prefill().shape  # doctest: +SKIP
(49152,)
>>> gen.step_layer(); gen.state.layer  # doctest: +SKIP
1
>>> model.detokenize([gen.step()])  # doctest: +SKIP
' Paris'
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rocmforge.constraints import masks_during
from rocmforge.errors import ContextOverflowError
from rocmforge.kv_cache import Batch
from rocmforge.logprobs import TokenLogprob, score, score_rows
from rocmforge.sampler import Sampler, SamplingParams, StopMatcher

if TYPE_CHECKING:
    from rocmforge.constraints import Constraint
    from rocmforge.model import Model


@dataclass(frozen=True)
class GenerationState:
    """A snapshot of a generation between steps (or between layers)."""

    position: int                 # next position that will be written to the KV cache
    tokens: tuple[int, ...]       # prompt followed by the generated tokens
    n_prompt: int
    kv_length: int                # positions cached so far (counts the in-flight forward's tokens)
    layer: int | None             # next layer step_layer() runs; None when no forward is in flight
    resid: np.ndarray | None      # residual stream [pos, d_model] of the in-flight forward (host copy)
    logits: np.ndarray | None     # logits [vocab] of the last position run through the whole model
    finish_reason: str | None     # "stop" | "length" | None while running


@dataclass
class _InFlight:
    batch: Batch
    layer: int
    resid: Any


class Generation:
    """One sequence being generated; create with ``Model.start``. Call ``close()`` (or finish it) to free its cache.

    ``logprobs``: record each sampled token's ``TokenLogprob`` with that many alternatives (``token_logprobs``);
    ``score_prompt``: also score the prompt's own tokens in the prefill (``prompt_logprobs``, from the second
    token on). ``constraint``: a grammar that masks the tokens the sampler may draw (``rocmforge.constraints``);
    the generation stops when the grammar is complete. ``share_prompt_of``: a prefilled generation of the same
    prompt whose KV blocks this one reads instead of running the prompt again (``n`` > 1 choices).
    """

    def __init__(self, model: "Model", prompt_ids: Sequence[int], params: SamplingParams,
                 max_new_tokens: int, stop: Sequence[str] = (), *, logprobs: int | None = None,
                 score_prompt: bool = False, constraint: "Constraint | None" = None,
                 share_prompt_of: "Generation | None" = None):
        if len(prompt_ids) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt_ids) > model.n_ctx:
            raise ContextOverflowError(
                f"prompt has {len(prompt_ids)} tokens but the context window is {model.n_ctx}")
        self.model, self.params, self.max_new_tokens = model, params, max_new_tokens
        self.sampler = Sampler(params)
        self.tokens: list[int] = [int(t) for t in prompt_ids]
        self.n_prompt = len(self.tokens)
        self.logits: np.ndarray | None = None
        self.finish_reason: str | None = None
        self.n_logprobs, self.score_prompt, self.constraint = logprobs, score_prompt, constraint
        self.token_logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self._fed = 0
        if share_prompt_of is not None and share_prompt_of._fed >= self.n_prompt:
            # every whole block of the prompt but the last token's: this sequence runs the rest for its logits
            self.seq_id = model.kv.fork(share_prompt_of.seq_id, self.n_prompt - 1)
            self._fed = model.kv.length(self.seq_id)
            self.prompt_logprobs = share_prompt_of.prompt_logprobs
        else:
            self.seq_id = model.kv.new_sequence()
        self._inflight: _InFlight | None = None
        self._stop = StopMatcher(stop)
        self._decoder = model.tokenizer.incremental_decoder()
        self._logprobs_taken = 0
        self._closed = False

    # --- state -----------------------------------------------------------------------------------------------
    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def state(self) -> GenerationState:
        inflight = self._inflight
        return GenerationState(
            position=self._fed, tokens=tuple(self.tokens), n_prompt=self.n_prompt,
            kv_length=self.model.kv.length(self.seq_id) if not self._closed else 0,
            layer=inflight.layer if inflight else None,
            resid=self.model.ops.to_host(inflight.resid) if inflight else None,
            logits=self.logits, finish_reason=self.finish_reason)

    # --- running ---------------------------------------------------------------------------------------------
    def prefill(self) -> np.ndarray:
        """Run the prompt (as one matrix per layer) and return the logits of its last position ``[vocab]``."""
        if self._fed == 0:
            step_all_forward([self])
        return self.logits

    def step(self) -> int | None:
        """Run the pending forward, sample the next token, and return it (None once the generation finished)."""
        return step_all([self])[0]

    def step_layer(self) -> int | None:
        """Run the next layer of the pending forward only; returns the index of the layer just run.

        With no forward in flight, it first samples the next token (as ``step`` would) and starts its forward;
        if that token ends the generation, nothing runs and it returns None. After the last layer it also
        computes the logits (``state.logits``).
        """
        arch, ctx = self.model.arch, self.model.ctx
        if self._inflight is None:
            if self._fed == len(self.tokens):
                self._sample_next()
            if self.finished:
                return None
            batch = self._prepare()
            self._inflight = _InFlight(batch, 0, arch.embed(ctx, batch.tokens))
        inflight = self._inflight
        inflight.resid = arch.block(ctx, inflight.layer, inflight.resid, inflight.batch)
        inflight.layer += 1
        if inflight.layer == self.model.cfg.n_layers:
            self._finish_inflight()
        return inflight.layer - 1

    def text_pieces(self) -> Iterator[str]:
        """Step until finished, yielding decoded text (stop strings removed, never half a UTF-8 character).

        End-of-generation tokens are not decoded. The sequence's cache is freed when the iterator ends.
        """
        try:
            while not self.finished:
                text = self.text_of(self.step())
                if text:
                    yield text
            rest = self.rest_of_text()
            if rest:
                yield rest
        finally:
            self.close()

    def text_of(self, token: int | None) -> str:
        """The text ``token`` (just sampled by ``step``) adds, stop strings held back or cut (then the
        generation finishes with "stop"); end tokens add nothing. Feed every token once, in order."""
        if token is None or token in self.model.tokenizer.eot_ids:
            return ""
        text, stopped = self._stop.feed(self._decoder.feed(token))
        if stopped:
            self.finish_reason = "stop"
        return text

    def rest_of_text(self) -> str:
        """Text still held back when the generation ended (a partial stop string, half a UTF-8 character)."""
        if self._stop.matched is not None:
            return ""
        return self._stop.feed(self._decoder.flush())[0] + self._stop.flush()

    def take_logprobs(self) -> list[TokenLogprob]:
        """The sampled tokens' ``TokenLogprob``s recorded since the last call (for streamed chunks)."""
        new = self.token_logprobs[self._logprobs_taken:]
        self._logprobs_taken = len(self.token_logprobs)
        return new

    def close(self) -> None:
        """Free this sequence's KV cache blocks (the generation cannot continue afterwards)."""
        if not self._closed:
            self.model.kv.free(self.seq_id)
            self._closed = True
            if self.finish_reason is None:
                self.finish_reason = "stop"

    # --- internals -------------------------------------------------------------------------------------------
    def _prepare(self) -> Batch:
        return self.model.kv.prepare([(self.seq_id, self.tokens[self._fed:])])

    def _finish_inflight(self) -> None:
        inflight, arch, ctx = self._inflight, self.model.arch, self.model.ctx
        last = inflight.batch.last_rows
        self.logits = self.model.ops.to_host(arch.unembed(ctx, ctx.ops.take_rows(inflight.resid, last)))[0]
        self._fed = len(self.tokens)
        self._inflight = None

    def _needs_forward(self) -> bool:
        return not self.finished and (self._inflight is not None or self._fed < len(self.tokens))

    def _sample_next(self, mask: np.ndarray | None = None) -> int | None:
        """Sample from the current logits (under ``mask``, the constraint's mask computed already, if given),
        record the token, and decide whether the generation is over."""
        if self.finished:
            return None
        constraint = self.constraint
        if constraint is not None and mask is None:
            mask = constraint.mask()
        return self._record(self.sampler.sample(self.logits, self.tokens, mask))

    def _record(self, token: int) -> int:
        """Append the next token (to the constraint and the logprobs too) and decide whether the generation is over."""
        constraint = self.constraint
        if constraint is not None:
            constraint.accept(token)
        if self.n_logprobs is not None:
            self.token_logprobs.append(score(self.logits, token, self.n_logprobs))
        self.tokens.append(token)
        if token in self.model.tokenizer.eot_ids or constraint is not None and constraint.done:
            self.finish_reason = "stop"
        elif self.n_generated >= self.max_new_tokens:
            self.finish_reason = "length"
        elif len(self.tokens) > self.model.n_ctx:
            self.finish_reason = "length"  # the token was sampled but the cache has no room to run it
        return token


def step_all_forward(generations: Sequence[Generation]) -> None:
    """Run the pending forward of every generation that has one, batched into one forward call."""
    pending = [g for g in generations if g._needs_forward()]
    for g in pending:
        while g._inflight is not None:  # a forward someone started layer by layer: finish it on its own
            g.step_layer()
    pending = [g for g in pending if g._fed < len(g.tokens)]
    if not pending:
        return
    model = pending[0].model
    batch = model.kv.prepare([(g.seq_id, g.tokens[g._fed:]) for g in pending])
    # the last row of each sequence, or all of them where the prompt is to be scored
    scoring = [g.score_prompt and g._fed == 0 for g in pending]
    row_ranges = [range(seg.rows.start, seg.rows.stop) if all_rows else range(seg.rows.stop - 1, seg.rows.stop)
                  for seg, all_rows in zip(batch.segments, scoring)]
    rows = np.fromiter((r for rr in row_ranges for r in rr), dtype=np.int64)

    def forward() -> Any:
        return model.arch.forward(model.ctx, batch, rows=rows)

    # A hook must see every op, so hooks run the forward eagerly; without them the backend may replay a captured
    # decode step instead (the GPU's graph; the CPU just calls forward)
    logits = model.ops.to_host(forward() if model.ctx.hooks.active else model.ops.graph_step(batch, forward))
    start = 0
    for g, rr, all_rows in zip(pending, row_ranges, scoring):
        mine, start = logits[start:start + len(rr)], start + len(rr)
        if all_rows:  # row i predicts token i + 1
            g.prompt_logprobs = score_rows(mine[:-1], g.tokens[1:len(rr)], g.n_logprobs or 0)
        g.logits, g._fed = mine[-1], len(g.tokens)


def step_all(generations: Sequence[Generation]) -> list[int | None]:
    """One decode tick for several generations: one batched forward, then each samples its next token.

    Prompts that were never prefilled go into the same batch (as their own segments). Returns each generation's
    new token, or None for those already finished. A tick of decode steps only, without hooks or logprobs, on a
    backend with ``graph_step_batch`` (the GPU) samples on the device as well, under each constraint's mask
    (computed while the device runs the forward; module docstring).
    """
    chosen = _decode_on_device([g for g in generations if g._needs_forward()])
    if chosen is not None:
        return [g._record(chosen[id(g)]) if id(g) in chosen else g._sample_next() for g in generations]
    constraints = [g.constraint if not g.finished else None for g in generations]
    masks = masks_during(constraints, lambda: step_all_forward(generations))
    return [g._sample_next(mask) for g, mask in zip(generations, masks)]


def _decode_on_device(pending: Sequence[Generation]) -> dict[int, int] | None:
    """Run the pending decode steps as one batched device graph with device sampling -> {id(generation): token};
    None (nothing run, no random number drawn) when the tick does not qualify."""
    if not pending:
        return None
    model = pending[0].model
    ops = model.ops
    if (not hasattr(ops, "graph_step_batch") or model.ctx.hooks.active or len(pending) > ops.max_batch_rows
            or any(g._inflight is not None or len(g.tokens) - g._fed != 1 or g.n_logprobs is not None
                   for g in pending)):
        return None
    rows = [g.sampler.device_row(g.tokens, model.cfg.vocab_size, ops.device_sampling_capacity) for g in pending]
    if any(r is None for r in rows):
        return None
    rows = [g.sampler.draw(r) for g, r in zip(pending, rows)]
    batch = model.kv.prepare([(g.seq_id, g.tokens[g._fed:]) for g in pending])
    constraints = [g.constraint for g in pending]

    def masks() -> list[np.ndarray | None]:  # called while the device runs the forward
        return [c.mask() if c is not None else None for c in constraints]

    tokens = ops.graph_step_batch(batch, lambda b: model.arch.forward(model.ctx, b, rows=b.last_rows), model.kv,
                                  rows, masks if any(c is not None for c in constraints) else None)
    if (tokens < 0).any():
        raise ValueError("every token is banned (all logits are -inf after logit_bias and the grammar's mask)")
    for g in pending:
        g.logits, g._fed = None, len(g.tokens)
    return {id(g): int(t) for g, t in zip(pending, tokens)}
