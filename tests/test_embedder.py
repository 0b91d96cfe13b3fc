"""MiniLM embeddings from rocmforge's numpy BERT vs transformers references; the hashed n-gram fallback."""
from __future__ import annotations

import base64
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from rocmforge import registry
from rocmforge.embedder import HashedNgramEmbedder, MiniLMEmbedder, default_embedder
from rocmforge.errors import FetchError

pytestmark = pytest.mark.model_text  # stored references: .ci/run repeats it under another BLAS kernel

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "minilm_embeddings.json").read_text())


def _reference() -> tuple[list[str], np.ndarray]:
    texts = [item["text"] for item in FIXTURES["items"]]
    vectors = np.stack([np.frombuffer(base64.b64decode(item["vector_f32_b64"]), dtype=np.float32)
                        for item in FIXTURES["items"]])
    return texts, vectors


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> MiniLMEmbedder:
    return MiniLMEmbedder(minilm_dir, batch_tokens=64)  # small batches: several per call


def test_minilm_matches_transformers_reference(minilm: MiniLMEmbedder) -> None:
    texts, reference = _reference()
    ours = minilm(texts)
    assert ours.shape == (len(texts), 384) and ours.dtype == np.float32
    cosines = np.sum(ours.astype(np.float64) * reference, axis=1)
    assert np.all(cosines >= 1 - 1e-5), cosines
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_minilm_truncates_at_256_tokens_like_sentence_transformers(minilm: MiniLMEmbedder) -> None:
    long_item = max(FIXTURES["items"], key=lambda item: item["n_tokens"])
    assert long_item["n_tokens"] == 256  # the fixture really was cut
    ids, offsets = minilm.encoder.tokenize([long_item["text"]])
    assert ids.shape == (256,) and offsets.tolist() == [0, 256]


def test_batching_and_order_do_not_change_vectors(minilm: MiniLMEmbedder) -> None:
    texts, _ = _reference()
    one_by_one = np.concatenate([minilm([t]) for t in texts])
    shuffled_order = [3, 0, 6, 2, 5, 1, 4]
    batched = minilm([texts[i] for i in shuffled_order])
    np.testing.assert_allclose(batched, one_by_one[shuffled_order], atol=2e-6)


def test_embedding_from_three_threads_at_once_equals_embedding_alone(minilm: MiniLMEmbedder) -> None:
    """The store embeds from any thread: three at once (one batched, two a text at a time) get the lone vectors."""
    texts, _ = _reference()
    alone = minilm(texts)
    got: dict[int, np.ndarray] = {}

    def embed(i: int) -> None:
        got[i] = minilm(texts) if i == 0 else np.concatenate([minilm([t]) for t in texts])

    threads = [threading.Thread(target=embed, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(3):
        np.testing.assert_allclose(got[i], alone, atol=2e-6)


def test_minilm_ranks_paraphrase_above_unrelated(minilm: MiniLMEmbedder) -> None:
    a, b, c = minilm(["How do I bake bread at home?", "A recipe for homemade bread.",
                      "The stock market fell sharply on Monday."])
    assert a @ b > a @ c + 0.3


def test_token_spans_cover_the_text_in_order(minilm: MiniLMEmbedder) -> None:
    text = "Tokenizers split unbelievable words into pieces."
    spans = minilm.token_spans(text)
    assert len(spans) > len(text.split())  # word pieces, not words; and no truncation applied
    assert all(a < b <= c for (a, b), (c, _) in zip(spans, spans[1:]))
    assert text[spans[0][0]:spans[0][1]].lower() == "token"


def test_hashed_ngram_embedder_is_deterministic_unit_and_lexical() -> None:
    embed = HashedNgramEmbedder(dim=256)
    v = embed(["sqlite write ahead log", "the write-ahead log of sqlite", "bananas are yellow", ""])
    assert v.shape == (4, 256) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v[:3], axis=1), 1.0, rtol=1e-6)
    assert np.all(v[3] == 0)  # nothing to hash
    assert v[0] @ v[1] > 0.5 > v[0] @ v[2]
    np.testing.assert_array_equal(v, HashedNgramEmbedder(dim=256)(["sqlite write ahead log", "the write-ahead log of sqlite",
                                                                   "bananas are yellow", ""]))


def test_default_embedder_falls_back_with_a_warning(monkeypatch, caplog) -> None:
    def no_network(name: str, progress: bool = True):
        raise FetchError("no network")

    monkeypatch.setattr(registry, "is_cached", lambda name: False)
    monkeypatch.setattr(registry, "pull", no_network)
    with caplog.at_level(logging.WARNING, logger="rocmforge.embedder"):
        embed = default_embedder()
    assert isinstance(embed, HashedNgramEmbedder)
    assert "hashed n-gram" in caplog.text and "no network" in caplog.text


def test_default_embedder_is_minilm_when_cached(minilm_dir: Path) -> None:
    assert isinstance(default_embedder(), MiniLMEmbedder)
