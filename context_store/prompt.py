"""Retrieved chunks -> the text of a prompt, plus the citations that say which chunks were used.

The engine calls this between ``store.search`` and its chat template: the returned text is the user
message (or the raw prompt for base models). Passages are numbered so the model can cite ``[1]``.

>>> from context_store.store import Hit
>>> hits = [Hit(7, 2, "notes/wal.md", "WAL lets readers run during a write.", 0, 36, 0.03)]
>>> text, citations = build_context_prompt("Why WAL?", hits)
>>> print(text)
Answer the question using only the numbered passages below. Cite passages like [1].
<BLANKLINE>
[1] (notes/wal.md) WAL lets readers run during a write.
<BLANKLINE>
Question: Why WAL?
>>> citations[0]["chunk_id"], citations[0]["source"]
(7, 'notes/wal.md')
"""
from __future__ import annotations

from typing import Any, Sequence

from context_store.store import Hit

DEFAULT_TEMPLATE = (
    "Answer the question using only the numbered passages below. Cite passages like [1].\n\n"
    "{context}\n\n"
    "Question: {question}"
)
PASSAGE_TEMPLATE = "[{n}] ({source}) {text}"


def build_context_prompt(question: str, hits: Sequence[Hit], template: str = DEFAULT_TEMPLATE,
                         passage_template: str = PASSAGE_TEMPLATE,
                         max_context_chars: int | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Fill ``template`` (placeholders ``{context}``, ``{question}``) with numbered passages.

    Passages are taken best first; with ``max_context_chars`` the ones that no longer fit are left
    out (and are not cited). Returns (prompt text, citations in passage order).
    """
    passages: list[str] = []
    citations: list[dict[str, Any]] = []
    used = 0
    for hit in hits:
        passage = passage_template.format(n=len(passages) + 1, source=hit.source, text=" ".join(hit.text.split()))
        if max_context_chars is not None and used + len(passage) > max_context_chars:
            continue
        used += len(passage) + 2
        passages.append(passage)
        citations.append({"n": len(passages), "chunk_id": hit.chunk_id, "document_id": hit.document_id,
                          "source": hit.source, "start": hit.start, "end": hit.end, "score": hit.score})
    return template.format(context="\n\n".join(passages), question=question), citations
