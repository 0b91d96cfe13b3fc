"""Split a document into overlapping chunks of about ``size`` tokens, keeping character offsets.

Tokens are character spans. By default a token is a word or a single punctuation mark; an embedder
may offer its own ``token_spans(text)`` (MiniLM does) so chunk sizes match the model's window.

>>> from context_store.chunk import chunk_text
>>> [c.text for c in chunk_text("one two three four five", size=3, overlap=1)]
['one two three', 'three four five']

``chunk_headings`` gives each chunk the line that says where it sits: the document's title and the headings
(markdown ``#`` or reST-style underlined) above the chunk's start.

>>> text = "Setup\\n=====\\nInstall it.\\n\\nUsage\\n=====\\nRun it."
>>> chunk_headings(text, chunk_text(text, size=8, overlap=2), title="guide.md")
['guide.md — Setup', 'guide.md — Setup — Usage', 'guide.md — Usage']
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Callable

_TOKEN = re.compile(r"\w+|[^\w\s]")
_MARKDOWN_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
_UNDERLINED_HEADING = re.compile(r"^([^\s].*)\n([=\-*~^#+])\2{2,}[ \t]*$", re.M)
HEADING_SEPARATOR = " — "

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


def headings(text: str) -> list[tuple[int, int, str]]:
    """(character offset, level, title) of every heading: markdown ``#`` levels, and reST-style underlines whose
    levels follow the order in which the underline characters first appear (as reST reads them)."""
    found = [(m.start(), len(m.group(1)), m.group(2).strip()) for m in _MARKDOWN_HEADING.finditer(text)]
    order: list[str] = []
    for m in _UNDERLINED_HEADING.finditer(text):
        title, mark = m.group(1).strip(), m.group(2)
        if abs(len(m.group(0).splitlines()[1].strip()) - len(title)) > 3:
            continue  # a rule under a paragraph line, not a heading
        if mark not in order:
            order.append(mark)
        found.append((m.start(), order.index(mark) + 1, title))
    return sorted(found)


def chunk_headings(text: str, chunks: list[Chunk], title: str = "") -> list[str]:
    """For each chunk: the title, then the heading path in force where the chunk starts and any heading inside it,
    joined by HEADING_SEPARATOR (empty when there is neither)."""
    marks = headings(text)
    out = []
    for chunk in chunks:
        path: list[tuple[int, str]] = []
        inside = []
        for offset, level, name in marks:
            if offset <= chunk.start:
                path = [(lv, n) for lv, n in path if lv < level] + [(level, name)]
            elif offset < chunk.end:
                inside.append(name)
        parts = [title] if title else []
        for name in [n for _, n in path] + inside:
            if name and name not in parts:
                parts.append(name)
        out.append(HEADING_SEPARATOR.join(parts))
    return out


def document_title(source: str, metadata: dict[str, Any]) -> str:
    """``metadata["title"]`` when given, else the file name of a path-like source (``notes/wal.md`` -> ``wal.md``)."""
    title = metadata.get("title")
    if isinstance(title, str) and title.strip():
        return title.strip()
    return "" if source.startswith("<") else PurePath(source).name
