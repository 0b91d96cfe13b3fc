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
    """Windows of at most ``size`` tokens, neighbours sharing about ``overlap`` tokens.

    With word-piece tokens a window never starts or ends inside a word: its edges move back to the
    nearest word boundary (a window keeps at least one whole word).
    """
    if size < 1:
        raise ValueError(f"chunk size must be at least 1 token, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, size), got {overlap} with size {size}")
    spans = (token_spans or word_spans)(text)

    def continues_word(i: int) -> bool:
        """Token i is glued to token i-1 inside one word (like '##ing' after 'read')."""
        return (0 < i < len(spans) and spans[i][0] == spans[i - 1][1]
                and text[spans[i][0] - 1].isalnum() and text[spans[i][0]].isalnum())

    chunks: list[Chunk] = []
    first = 0
    while first < len(spans):
        hard_last = last = min(first + size, len(spans)) - 1
        while last > first and continues_word(last + 1):
            last -= 1  # do not cut the word that runs past the window
        if continues_word(last + 1):
            last = hard_last  # one word longer than the window: cutting it is unavoidable
        start, end = spans[first][0], spans[last][1]
        chunks.append(Chunk(text[start:end], start, end, last - first + 1))
        if last + 1 >= len(spans):
            break
        # The next window starts about `overlap` tokens back, at a word start: the nearest one
        # before that point, else the next one after it.
        following = max(first + 1, last + 1 - overlap)
        back = following
        while back > first and continues_word(back):
            back -= 1
        if back > first:
            following = back
        else:
            while following <= last and continues_word(following):
                following += 1
        first = following
    return chunks
