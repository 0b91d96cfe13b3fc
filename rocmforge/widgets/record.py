"""One generation run with everything the panel shows: streamed text, per-token probabilities, timings.

The probabilities come from the sampler itself: ``RecordingSampler`` is a ``Sampler`` whose ``sample``
computes ``distribution()`` once and draws from it with ``sample_from()`` (same random stream, same token),
so what the token view shows is exactly what the token was drawn from, and the text equals
``Model.generate`` with the same settings.

>>> import rocmforge  # doctest: +SKIP
>>> model = rocmforge.load("smollm2-135m")  # doctest: +SKIP
>>> ids = model.tokenize("The capital of France is")  # doctest: +SKIP
>>> result = record_generation(model, ids, SamplingParams(temperature=0), max_new_tokens=3)  # doctest: +SKIP
>>> result.text, result.tokens[0].alternatives[0][1]  # doctest: +SKIP
(' Paris. It', ' Paris')
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rocmforge.engine import Generation
from rocmforge.sampler import Sampler, SamplingParams, top_alternatives

N_ALTERNATIVES = 5


@dataclass(frozen=True)
class TokenStep:
    """One sampled token: its id and display text, the probability it was drawn with, and the top alternatives
    ``(token_id, text, probability)`` of that step's distribution, most likely first."""

    token_id: int
    text: str
    probability: float
    alternatives: tuple[tuple[int, str, float], ...]


@dataclass
class GenerationResult:
    """What one run of the panel produced. ``stats`` holds ``n_prompt``, ``n_generated``, ``ttft_s`` (prompt
    submitted -> first token sampled), ``tokens_per_s`` (decode rate after the first token), ``total_s``."""

    prompt: str
    prompt_ids: list[int]
    text: str = ""
    tokens: list[TokenStep] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    stats: dict[str, float] = field(default_factory=dict)
    passages: list[Any] = field(default_factory=list)  # context_store Hits given to the model
    cited: list[int] = field(default_factory=list)     # indexes into passages the answer cites as [n]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def token_ids(self) -> list[int]:
        return [t.token_id for t in self.tokens]

    @property
    def probabilities(self) -> list[float]:
        return [t.probability for t in self.tokens]

    @property
    def alternatives(self) -> list[tuple[tuple[int, str, float], ...]]:
        return [t.alternatives for t in self.tokens]


class Cancelled(Exception):
    """Raised inside the sampler when Stop was pressed: no further token is drawn."""


class RecordingSampler(Sampler):
    """A ``Sampler`` that reports each step's distribution and honours a stop request before drawing."""

    def __init__(self, params: SamplingParams, on_step: Callable[[int, np.ndarray], None],
                 stop_requested: threading.Event) -> None:
        super().__init__(params)
        self._on_step, self._stop_requested = on_step, stop_requested

    def sample(self, logits: np.ndarray, history: Sequence[int], mask: np.ndarray | None = None) -> int:
        # Checked here, between the forward and the draw: Stop never lets more than the token in flight finish.
        if self._stop_requested.is_set():
            raise Cancelled
        probs = self.distribution(logits, history, mask)
        token = self.sample_from(probs)  # the same draw `Sampler.sample` makes from the same generator state
        self._on_step(token, probs)
        return token


def record_generation(model: Any, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int, *,
                      prompt: str = "", on_text: Callable[[str], None] | None = None,
                      on_token: Callable[[TokenStep], None] | None = None,
                      stop_requested: threading.Event | None = None) -> GenerationResult:
    """Generate from ``prompt_ids``, calling ``on_text(piece)`` as text is produced and ``on_token(step)`` per token.

    Setting ``stop_requested`` ends the run before the next token is drawn (``finish_reason`` "cancelled").
    """
    stop_requested = stop_requested or threading.Event()
    result = GenerationResult(prompt=prompt, prompt_ids=list(prompt_ids))
    tokenizer = model.tokenizer
    started = time.perf_counter()
    sampled_at: list[float] = []

    def record(token: int, probs: np.ndarray) -> None:
        sampled_at.append(time.perf_counter())
        alternatives = tuple((t, tokenizer.token_text(t), p) for t, p in top_alternatives(probs, N_ALTERNATIVES))
        step = TokenStep(token, tokenizer.token_text(token), float(probs[token]), alternatives)
        result.tokens.append(step)
        if on_token is not None:
            on_token(step)

    gen = Generation(model, prompt_ids, params, max_new_tokens)
    gen.sampler = RecordingSampler(params, record, stop_requested)
    pieces: list[str] = []
    try:
        for piece in gen.text_pieces():
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
        result.finish_reason = gen.finish_reason
    except Cancelled:
        result.finish_reason = "cancelled"  # text_pieces closed the generation on its way out
    result.text = "".join(pieces)
    result.stats = _stats(len(prompt_ids), started, sampled_at)
    return result


def _stats(n_prompt: int, started: float, sampled_at: list[float]) -> dict[str, float]:
    finished = time.perf_counter()
    n = len(sampled_at)
    stats = {"n_prompt": n_prompt, "n_generated": n, "total_s": finished - started,
             "ttft_s": sampled_at[0] - started if n else float("nan"), "tokens_per_s": float("nan")}
    if n >= 2 and sampled_at[-1] > sampled_at[0]:
        stats["tokens_per_s"] = (n - 1) / (sampled_at[-1] - sampled_at[0])
    return stats
