"""Retrieval into prompts: Model.generate / create_chat_completion with context=store, citations, template."""
from __future__ import annotations

import pytest

import rocmforge
from context_store.prompt import build_context_prompt
from context_store import ContextStore
from rocmforge.embedder import HashedNgramEmbedder
from rocmforge.model import ANSWER_SAMPLING

DOCS = {
    "wal.md": "SQLite in WAL mode lets readers keep reading while one writer commits a transaction.",
    "hnsw.md": "The HNSW index is rebuilt from SQLite when its file is missing or damaged after a crash.",
    "tea.md": "To make tea, boil water and pour it over the leaves for three minutes.",
}


@pytest.fixture(scope="module")
def model(smollm2_path):
    return rocmforge.load(smollm2_path, device="cpu", n_ctx=512)


@pytest.fixture
def store(tmp_path):
    with ContextStore(tmp_path / "ctx.db", embed=HashedNgramEmbedder()) as s:
        for name, text in DOCS.items():
            s.add_text(text, source=name)
        yield s


def test_generate_with_context_is_generate_on_the_built_prompt(model, store):
    question = "What happens to the HNSW index after a crash?"
    expected_prompt, citations = build_context_prompt(question, store.search(question, k=2))
    assert citations[0]["source"] == "hnsw.md"
    with_context = model.generate(question, max_new_tokens=12, temperature=0, context=store, k=2)
    assert with_context == model.generate(expected_prompt, max_new_tokens=12, temperature=0, **ANSWER_SAMPLING)


def test_chat_completion_returns_citations_and_honours_the_template(model, store):
    question = "How do readers and writers share SQLite?"
    out = model.create_chat_completion([{"role": "user", "content": question}], max_tokens=8, temperature=0,
                                       context=store, k=1)
    assert [c["source"] for c in out["citations"]] == ["wal.md"]
    model.context_template = "Notes:\n{context}\nQ: {question}"
    try:
        prompt, _ = model.context_prompt(question, store, k=1)
    finally:
        model.context_template = None
    assert prompt.startswith("Notes:\n[1] (wal.md) SQLite in WAL mode") and prompt.endswith(f"Q: {question}")
    default_prompt, _ = model.context_prompt(question, store, k=1)
    assert default_prompt.startswith("Answer the question using only the numbered passages below.")
