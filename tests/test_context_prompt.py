"""build_context_prompt: numbered passages in rank order, citations that point back at the chunks."""
from __future__ import annotations

from pathlib import Path

from context_store import ContextStore
from context_store.prompt import build_context_prompt
from rocmforge.embedder import HashedNgramEmbedder


def test_prompt_numbers_passages_and_cites_the_chunks(tmp_path: Path) -> None:
    with ContextStore(tmp_path / "ctx.db", embed=HashedNgramEmbedder(), chunk_size=10, chunk_overlap=2) as store:
        store.add_text("The harbor lantern burns all night. Ships follow it home through fog.", source="harbor.md")
        store.add_text("Maple trees turn red in autumn and drop their leaves.", source="maple.md")
        hits = store.search("lantern in the fog", k=3)
        prompt, citations = build_context_prompt("What guides ships?", hits,
                                                 template="Context:\n{context}\nQ: {question}\nA:")
    assert prompt.startswith("Context:\n[1] (") and prompt.endswith("\nQ: What guides ships?\nA:")
    assert [c["n"] for c in citations] == list(range(1, len(hits) + 1))
    for c, hit in zip(citations, hits):
        assert (c["chunk_id"], c["source"], c["start"], c["end"]) == (hit.chunk_id, hit.source, hit.start, hit.end)
        assert f"[{c['n']}] ({hit.source}) {' '.join(hit.text.split())}" in prompt
    assert citations[0]["source"] == "harbor.md"


def test_passages_that_do_not_fit_are_left_out_and_not_cited(tmp_path: Path) -> None:
    with ContextStore(tmp_path / "ctx.db", embed=HashedNgramEmbedder()) as store:
        for i in range(4):
            store.add_text(f"note {i}: " + "filler words " * (5 + 20 * (i % 2)), source=f"n{i}")
        hits = store.search("note filler", k=4)
    full, all_cited = build_context_prompt("q", hits)
    budget = len(f"[1] ({hits[0].source}) {' '.join(hits[0].text.split())}") + 5
    short, cited = build_context_prompt("q", hits, max_context_chars=budget)
    assert len(all_cited) == 4 and 1 <= len(cited) < 4
    assert cited[0]["chunk_id"] == hits[0].chunk_id
    assert len(short) < len(full) and "[%d]" % (len(cited) + 1) not in short
