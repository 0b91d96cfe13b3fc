"""Token log-probabilities, and the two shapes OpenAI (and llama-cpp-python) return them in.

A log-probability here is the model's own: ``log_softmax`` of the raw logits, before logit bias, penalties,
temperature or a grammar mask, as OpenAI, vLLM and llama-cpp-python report it. That is what an evaluation
harness wants (lm-evaluation-harness sums them over a continuation), whatever the request sampled with.

>>> import numpy as np
>>> entry = score(np.log(np.array([0.5, 0.25, 0.25], dtype=np.float32)), token=1, n_top=1)
>>> entry.token, round(entry.logprob, 4), [(t, round(p, 4)) for t, p in entry.top]
(1, -1.3863, [(0, -0.6931)])
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rocmforge.tokenizer import Tokenizer

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs (completions allow 5; we allow 20 on both)


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its log-probability and the ``n_top`` most likely tokens there (most likely first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of float32 logits (last axis)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def score(logits: np.ndarray, token: int, n_top: int) -> TokenLogprob:
    """``token``'s log-probability under ``logits`` [vocab] and the ``n_top`` most likely tokens there."""
    logprobs = log_softmax(logits)
    return TokenLogprob(int(token), float(logprobs[token]), _top(logprobs, n_top))


def score_rows(logits: np.ndarray, tokens: Sequence[int], n_top: int) -> list[TokenLogprob]:
    """``score`` for each row of ``logits`` [n, vocab] with the token that followed it."""
    logprobs = log_softmax(logits)
    return [TokenLogprob(int(t), float(row[t]), _top(row, n_top)) for row, t in zip(logprobs, tokens)]


def _top(logprobs: np.ndarray, n: int) -> tuple[tuple[int, float], ...]:
    if n <= 0:
        return ()
    ids = np.argpartition(logprobs, len(logprobs) - n)[len(logprobs) - n:]
    ids = ids[np.lexsort((ids, -logprobs[ids]))]  # most likely first, ties by lower id
    return tuple((int(t), float(logprobs[t])) for t in ids)


def completion_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob | int], text_offset: int = 0) -> dict:
    """The completions shape: ``{"tokens", "text_offset", "token_logprobs", "top_logprobs"}``.

    A bare token id stands for a token without a log-probability (the first token of an echoed prompt): its
    text is listed, its log-probabilities are ``null``. ``text_offset`` is where the first token's text starts
    in the returned text (llama-cpp-python: after the prompt unless the prompt is echoed).
    """
    out: dict[str, list] = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
    for entry in entries:
        scored = isinstance(entry, TokenLogprob)
        text = tokenizer.token_text(entry.token if scored else entry)
        out["tokens"].append(text)
        out["text_offset"].append(text_offset)
        out["token_logprobs"].append(entry.logprob if scored else None)
        out["top_logprobs"].append({tokenizer.token_text(t): p for t, p in entry.top} if scored else None)
        text_offset += len(text)
    return out


def chat_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob]) -> dict:
    """The chat shape: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}``."""
    def item(token: int, logprob: float) -> dict:
        return {"token": tokenizer.token_text(token), "logprob": logprob,
                "bytes": list(tokenizer.token_bytes(token))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, p) for t, p in e.top]}
                        for e in entries], "refusal": None}
