"""Split a document into overlapping chunks of about ``size`` tokens, keeping character offsets.

Tokens are character spans. By default a token is a word or a single punctuation mark; an embedder
may offer its own ``token_spans(text)`` (MiniLM does) so chunk sizes match the model's window.

>>> from context_store.chunk import chunk_text
>>> [c.text for c in chunk_text("one two three four five", size=3, overlap=1)]
['one two three', 'three four five']
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

_TOKEN = re.compile(r"\w+|[^\w\s]")

TokenSpans = Callable[[str], list[tuple[int, int]]]


@dataclass(frozen=True)
class Chunk:
    text: str
    start: int  # character offset of the chunk in the document
    end: int
    n_tokens: int


def word_spans(text: str) -> list[tuple[int, int]]:
    """Words and punctuation marks as (start, end) character spans."""
    return [m.span() for m in _TOKEN.finditer(text)]


def chunk_text(text: str, size: int = 200, overlap: int = 40,
               token_spans: TokenSpans | None = None) -> list[Chunk]:
    """Windows of ``size`` tokens, each starting ``size - overlap`` tokens after the previous one."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1 token, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, size), got {overlap} with size {size}")
    spans = (token_spans or word_spans)(text)
    chunks = []
    step = size - overlap
    for first in range(0, max(len(spans), 1), step):
        window = spans[first:first + size]
        if not window:
            break
        start, end = window[0][0], window[-1][1]
        chunks.append(Chunk(text[start:end], start, end, len(window)))
        if first + size >= len(spans):
            break
    return chunks
