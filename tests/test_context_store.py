"""ContextStore behaviour on both backends (SQLite + HNSW, PostgreSQL + pgvector): dedupe, deletes that really
delete, keyword ranking, fusion, filters, HNSW recall; and the SQLite index's repair."""
from __future__ import annotations

import json
import math
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from context_store import ContextStore, ContextStoreError
from context_store.chunk import chunk_text
from context_store.keyword_terms import FTS_TOKENIZE, FTS_WEIGHTS
from context_store.search import cosine_top_k, fts_query, reciprocal_rank_fusion, score_fusion
from rocmforge.embedder import HashedNgramEmbedder
from store_backends import is_sqlite, query, stored_chunk_ids

ANIMALS = {
    "cats.txt": "Cats purr when they are content and sleep most of the afternoon in the sun.",
    "dogs.txt": "Dogs bark at the mail carrier and love long walks in the park.",
    "owls.txt": "Owls hunt at night; their soft feathers make their flight almost silent.",
    "bees.txt": "Bees dance to tell the hive where the flowers with nectar are.",
}


class LookupEmbed:
    """texts like 'v17' -> a fixed random unit vector, so vector search has a known exact answer."""

    name = "lookup"

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors
        self.dim = vectors.shape[1]

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.vectors[[int(t[1:]) for t in texts]]


@pytest.fixture()
def store(store_location):
    with ContextStore(store_location, embed=HashedNgramEmbedder(), chunk_size=12, chunk_overlap=3) as s:
        for source, text in ANIMALS.items():
            s.add_text(text, source=source, metadata={"kind": "animal", "legs": 4 if source in ("cats.txt", "dogs.txt") else 2})
        yield s


def test_chunks_have_size_overlap_and_true_offsets() -> None:
    text = " ".join(f"w{i}" for i in range(25))
    chunks = chunk_text(text, size=10, overlap=4)
    assert [c.n_tokens for c in chunks] == [10, 10, 10, 7]
    for c in chunks:
        assert text[c.start:c.end] == c.text
    assert chunks[1].text.split()[:4] == chunks[0].text.split()[-4:]  # the overlap
    assert chunks[-1].text.endswith("w24")
    with pytest.raises(ValueError):
        chunk_text(text, size=5, overlap=5)


def test_identical_content_is_skipped_by_hash(store: ContextStore) -> None:
    before = store.stats()
    again = store.add_text(ANIMALS["cats.txt"], source="elsewhere.txt")
    assert again.skipped and again.n_chunks == 0
    assert store.get(again.document_id).source == "cats.txt"
    after = store.stats()
    assert (after["documents"], after["chunks"]) == (before["documents"], before["chunks"])
    # another collection is another namespace
    assert not store.add_text(ANIMALS["cats.txt"], collection="pets").skipped
    batch = store.add_texts(["new one", "new one", ANIMALS["dogs.txt"]])
    assert [r.skipped for r in batch] == [False, True, True]
    assert batch[0].document_id == batch[1].document_id


def _fts5_bm25(store: ContextStore, match: str) -> dict[int, float]:
    """SQLite FTS5's own BM25 (negated: higher is better) of the store's chunks, whichever backend holds them."""
    table = "chunks" if is_sqlite(store) else "context_store.chunks"
    fts = sqlite3.connect(":memory:")
    fts.execute(f"CREATE VIRTUAL TABLE t USING fts5(text, heading, tokenize='{FTS_TOKENIZE}')")
    fts.executemany("INSERT INTO t (rowid, text, heading) VALUES (?, ?, ?)",
                    query(store, f"SELECT id, text, heading FROM {table}"))
    weights = f"{FTS_WEIGHTS['text']}, {FTS_WEIGHTS['heading']}"
    return dict(fts.execute(f"SELECT rowid, -bm25(t, {weights}) FROM t WHERE t MATCH ?", (match,)).fetchall())


def test_keyword_search_ranks_by_fts5_bm25_on_both_backends(store: ContextStore) -> None:
    hits = store.search("nectar flowers", k=3, mode="keyword")
    assert hits[0].source == "bees.txt"
    assert "nectar" in hits[0].text
    assert hits[0].scores["keyword"] == hits[0].score > 0
    assert store.search("zebra", mode="keyword") == []
    # every score is SQLite FTS5's bm25 of the same chunks (PostgreSQL computes it from its term statistics)
    store.add_text("Bees and wasps: sorting the hive's nectar. Sorted flowers, sorts of bees.", source="hive.md")
    for text in ("nectar flowers", "how are bees sorting nectar?", "the"):
        hits = store.search(text, k=50, mode="keyword")
        expected = _fts5_bm25(store, fts_query(text))
        assert len(hits) == len(expected) > 0
        assert {h.chunk_id: h.score for h in hits} == pytest.approx(expected, rel=1e-12)


def test_vector_hits_carry_text_source_offsets_and_cosine(store: ContextStore) -> None:
    hits = store.search("owls hunt at night", k=2, mode="vector")
    top = hits[0]
    assert top.source == "owls.txt"
    doc = store.get(top.document_id)
    assert doc.content[top.start:top.end] == top.text
    embed = HashedNgramEmbedder()
    q, v = embed(["owls hunt at night", top.text])  # the chunk's text alone is embedded
    assert top.heading == "owls.txt"  # its heading (here the file name) goes to the keyword index
    assert top.score == pytest.approx(float(q @ v), abs=1e-5)
    assert hits[0].score >= hits[1].score


def test_rrf_is_reciprocal_rank_fusion_of_both_lists(store: ContextStore) -> None:
    query = "silent flight of owls at night"
    pool = 40
    vector = [h.chunk_id for h in store.search(query, k=pool, mode="vector")]
    keyword = [h.chunk_id for h in store.search(query, k=pool, mode="keyword")]
    hybrid = store.search(query, k=5, mode="rrf")
    expected = reciprocal_rank_fusion([vector, keyword])[:5]
    assert [h.chunk_id for h in hybrid] == [i for i, _ in expected]
    for hit, (_, score) in zip(hybrid, expected):
        assert hit.score == pytest.approx(score)
        rank_v = vector.index(hit.chunk_id) + 1 if hit.chunk_id in vector else None
        rank_k = keyword.index(hit.chunk_id) + 1 if hit.chunk_id in keyword else None
        assert score == pytest.approx(sum(1 / (60 + r) for r in (rank_v, rank_k) if r))


def test_hybrid_scores_every_candidate_by_both_and_fuses_them(store: ContextStore) -> None:
    query = "silent flight of owls at night"
    cosines = {h.chunk_id: h.score for h in store.search(query, k=100, mode="vector")}  # every chunk's cosine
    keyword_scores = {h.chunk_id: h.score for h in store.search(query, k=100, mode="keyword")}
    hybrid = store.search(query, k=5, mode="hybrid")
    expected = score_fusion(cosines, keyword_scores)[:5]
    assert [h.chunk_id for h in hybrid] == [i for i, _ in expected]
    for hit, (_, score) in zip(hybrid, expected):
        assert hit.score == pytest.approx(score) and hit.scores["hybrid"] == pytest.approx(score)
        assert hit.scores["vector"] == pytest.approx(cosines[hit.chunk_id], abs=1e-5)
    assert hybrid[0].source == "owls.txt" and hybrid[0].heading == "owls.txt"


def test_score_fusion_keeps_a_confident_dense_hit() -> None:
    # chunk 1 is far ahead by cosine and has no keyword match; 2 and 3 are middling on both lists
    cosines, keyword_scores = {1: 0.9, 2: 0.42, 3: 0.40, 4: 0.2}, {2: 5.0, 3: 5.5, 4: 1.0}
    assert score_fusion(cosines, keyword_scores)[0][0] == 1
    assert reciprocal_rank_fusion([[1, 2, 3, 4], [3, 2, 4]])[0][0] != 1  # rank fusion drops it
    assert score_fusion({}, {}) == []


def test_rrf_by_hand() -> None:
    fused = reciprocal_rank_fusion([[10, 20, 30], [30, 40]])
    scores = dict(fused)
    assert scores[30] == pytest.approx(1 / 63 + 1 / 61)
    assert scores[10] == pytest.approx(1 / 61)
    assert [i for i, _ in fused] == [30, 10, 20, 40]  # 20 and 40 tie at 1/62: smaller id first


def test_metadata_collection_and_source_filters(store: ContextStore) -> None:
    store.add_text("Spiders have eight legs and spin silk webs.", source="spiders.md", collection="bugs",
                   metadata={"kind": "animal", "legs": 8})
    for mode in ("vector", "keyword", "hybrid"):
        two_legged = store.search("animals", k=10, mode=mode, filters={"legs": 2})
        assert {h.source for h in two_legged} <= {"owls.txt", "bees.txt"}
    hits = store.search("legs", k=10, mode="hybrid", filters={"collection": "bugs"})
    assert {h.source for h in hits} == {"spiders.md"} and hits[0].collection == "bugs"
    assert {h.source for h in store.search("the", k=10, mode="vector", filters={"source": "*s.txt", "legs": [4]})} \
        == {"cats.txt", "dogs.txt"}


def test_delete_really_deletes_and_vacuum_shrinks(store_location) -> None:
    with ContextStore(store_location, embed=HashedNgramEmbedder(), chunk_size=50, chunk_overlap=10) as s:
        rng = np.random.default_rng(0)
        words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]
        ids = [s.add_text(" ".join(rng.choice(words, 400)) + f" marker{i}", source=f"d{i}").document_id
               for i in range(30)]
        victim = ids[7]
        victim_chunks = [c["id"] for c in s.chunks(victim)]
        assert s.search("marker7", k=3, mode="keyword")[0].document_id == victim
        assert s.delete(victim) and not s.delete(victim)
        assert s.get(victim) is None
        assert s.search("marker7", k=5, mode="keyword") == []
        assert all(h.document_id != victim for h in s.search("marker7 alpha", k=200, mode="vector"))
        assert not (set(victim_chunks) & stored_chunk_ids(s))
        if is_sqlite(s):
            assert not (set(victim_chunks) & s.backend.index.live)
        for i in ids[:20]:
            s.delete(i)
        sizes = s.vacuum()
        assert sizes["bytes_after"] < sizes["bytes_before"] * 0.6
        assert len(stored_chunk_ids(s)) == len(s) == sum(d.n_chunks for d in s.list())
        if is_sqlite(s):
            assert len(s.backend.index.deleted) == 0 and len(s.backend.index) == len(s)
            assert query(s, "SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH 'marker7'") == [(0,)]
            assert query(s, "SELECT count(*) FROM deleted_chunks") == [(0,)]
        else:
            assert query(s, "SELECT count(*) FROM context_store.chunks WHERE jsonb_exists(terms, 'marker7')") == [(0,)]
            # the keyword totals (BM25's N and average length) follow the deletes, cascades included
            assert query(s, "SELECT chunks, terms FROM context_store.keyword_stats") == query(
                s, "SELECT count(*), sum(n_terms) FROM context_store.chunks")


def test_hnsw_recall_against_brute_force(store_location) -> None:
    rng = np.random.default_rng(1)
    n, dim, k = 3000, 32, 10
    vectors = rng.standard_normal((n + 50, dim)).astype(np.float32)
    embed = LookupEmbed(vectors)
    with ContextStore(store_location, embed=embed, ef=100) as s:
        s.add_texts([f"v{i}" for i in range(n)], sources=[f"s{i}" for i in range(n)])
        ids = list(range(1, n + 1))  # chunk ids are 1..n in insertion order
        recalls = []
        for q in range(n, n + 50):
            exact = {i for i, _ in cosine_top_k(vectors[q], ids, vectors[:n], k)}
            found = {h.chunk_id for h in s.search(f"v{q}", k=k, mode="vector")}
            recalls.append(len(exact & found) / k)
            np.testing.assert_allclose([h.score for h in s.search(f"v{q}", k=1, mode="vector")],
                                       [max(cosine_top_k(vectors[q], ids, vectors[:n], 1)[0][1], 0)], atol=1e-5)
    assert np.mean(recalls) >= 0.95


def test_index_files_deleted_or_corrupted_are_rebuilt(tmp_path: Path, caplog) -> None:
    path = tmp_path / "ctx.db"
    with ContextStore(path, embed=HashedNgramEmbedder()) as s:
        for source, text in ANIMALS.items():
            s.add_text(text, source=source)
        expected = [h.chunk_id for h in s.search("cats purr", k=4, mode="vector")]
    meta = json.loads(Path(str(path) + ".hnsw.json").read_text())
    data = path.parent / meta["file"]
    data.write_bytes(b"\x00garbage" * 100)  # corrupt it
    with ContextStore(path, embed=HashedNgramEmbedder()) as s:
        assert "damaged" in caplog.text
        assert [h.chunk_id for h in s.search("cats purr", k=4, mode="vector")] == expected
        assert len(s.backend.index) == len(s) == 4
    for p in path.parent.glob("ctx.db.hnsw*"):
        p.unlink()  # delete them
    with ContextStore(path, embed=HashedNgramEmbedder()) as s:
        assert [h.chunk_id for h in s.search("cats purr", k=4, mode="vector")] == expected
    assert Path(str(path) + ".hnsw.json").exists()


def test_stale_saved_index_catches_up_on_open(tmp_path: Path) -> None:
    path = tmp_path / "ctx.db"
    with ContextStore(path, embed=HashedNgramEmbedder()) as s:
        s.add_text(ANIMALS["cats.txt"], source="cats.txt")
        s.save()
        saved = json.loads(Path(str(path) + ".hnsw.json").read_text())
        s.add_text(ANIMALS["dogs.txt"], source="dogs.txt")
        doomed = s.add_text(ANIMALS["owls.txt"], source="owls.txt").document_id
        s.delete(doomed)
        # simulate a crash: put the old saved state back, as if close() never ran
        s.backend.index.dirty = False
    Path(str(path) + ".hnsw.json").write_text(json.dumps(saved))
    with ContextStore(path, embed=HashedNgramEmbedder()) as s:
        assert s.backend.index.last_add_seq == max(c["id"] for d in s.list() for c in s.chunks(d.id))
        assert {h.source for h in s.search("dogs bark", k=5, mode="vector")} == {"cats.txt", "dogs.txt"}


def test_wrong_embedder_is_refused_and_reembed_switches(store_location) -> None:
    path = store_location
    with ContextStore(path, embed=HashedNgramEmbedder()) as s:
        s.add_text(ANIMALS["bees.txt"], source="bees.txt")
    other = HashedNgramEmbedder(dim=128)
    with pytest.raises(ContextStoreError, match="384-dim"):
        ContextStore(path, embed=other)
    with ContextStore(path, embed=other, reembed=True) as s:
        hit = s.search("bees dance", k=1, mode="vector")[0]
        assert s.stats()["embedder"] == "hashed-ngram-128"
        assert hit.score == pytest.approx(float(np.dot(*other(["bees dance", hit.text]))), abs=1e-5)


def test_bad_inputs_raise_clear_errors(store: ContextStore) -> None:
    with pytest.raises(ContextStoreError, match="nothing to index"):
        store.add_text("   ")
    with pytest.raises(ContextStoreError, match="unknown search mode"):
        store.search("x", mode="semantic")
    with pytest.raises(ContextStoreError, match="cannot read"):
        store.add_document("/no/such/file.txt")
    assert math.isclose(len(store.search("cats", k=2)), 2)


def test_a_file_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_text("just some text, long enough to fill SQLite's 100-byte header check. " * 3)
    with pytest.raises(ContextStoreError, match="is not a context store"):
        ContextStore(not_a_db, embed=HashedNgramEmbedder())


def test_word_piece_chunks_start_and_end_on_word_boundaries() -> None:
    text = "Unbelievably, tokenizers fragment uncommon words: photosynthesis, antidisestablishmentarianism."
    pieces = []
    for m in re.finditer(r"\w+|[^\w\s]", text):  # split every word in two, like ##pieces
        a, b = m.span()
        mid = a + max(1, (b - a) // 2) if b - a > 1 else b
        pieces += [(a, mid), (mid, b)] if mid < b else [(a, b)]
    chunks = chunk_text(text, size=5, overlap=2, token_spans=lambda t: pieces)
    assert len(chunks) > 3
    for c in chunks:
        assert c.n_tokens <= 5 and text[c.start:c.end] == c.text
        assert c.start == 0 or not text[c.start - 1].isalnum()  # never starts inside a word
        assert c.end == len(text) or not text[c.end].isalnum()  # never ends inside one
    words = set(re.findall(r"\w+", text))
    assert words == {w for c in chunks for w in re.findall(r"\w+", c.text)}  # nothing lost


def test_save_leaves_exactly_the_file_the_json_names(tmp_path: Path) -> None:
    path = tmp_path / "ctx.db"
    orphan = tmp_path / "ctx.db.hnsw.deadbeef.bin"  # as if a crash interrupted a save
    orphan.write_bytes(b"half a file")
    with ContextStore(path, embed=HashedNgramEmbedder()) as s:
        s.add_text(ANIMALS["owls.txt"])
        s.save()
        s.add_text(ANIMALS["bees.txt"])
    named = json.loads(Path(str(path) + ".hnsw.json").read_text())["file"]
    assert [p.name for p in tmp_path.glob("ctx.db.hnsw.*.bin")] == [named]


def test_old_sqlite_store_gets_stemmed_keyword_index_and_headings_on_open(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with ContextStore(path, embed=HashedNgramEmbedder()) as s:
        s.add_text("The walrus was swimming slowly.", source="notes/walrus.md")
    conn = sqlite3.connect(path)  # make it look like a store from before: unstemmed, text-only FTS, no heading
    conn.executescript("""
        DROP TRIGGER chunks_ai; DROP TRIGGER chunks_ad; DROP TABLE chunks_fts;
        ALTER TABLE chunks DROP COLUMN heading;
        CREATE VIRTUAL TABLE chunks_fts USING fts5(text, content='chunks', content_rowid='id', tokenize='unicode61');
        INSERT INTO chunks_fts(chunks_fts) VALUES ('rebuild');""")
    assert conn.execute("SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH 'swim'").fetchone()[0] == 0
    conn.close()
    with ContextStore(path, embed=HashedNgramEmbedder()) as s:
        hits = s.search("swim", mode="keyword")  # porter: "swimming" -> "swim"
        assert [h.source for h in hits] == ["notes/walrus.md"] and hits[0].heading == ""
        s.add_text("Seals are swimming too.", source="notes/seals.md")
        assert {h.heading for h in s.search("swims", k=5, mode="keyword")} == {"", "seals.md"}


def test_older_postgres_store_gets_its_keyword_terms_on_open(local_postgres) -> None:
    url = local_postgres.new_database()
    with ContextStore(url, embed=HashedNgramEmbedder(), chunk_size=12, chunk_overlap=3) as store:
        for source, text in ANIMALS.items():
            store.add_text(text, source=source)
        expected = {h.chunk_id: h.score for h in store.search("bees dance at night", k=50, mode="keyword")}
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:  # last session's schema: ts_rank over a generated tsvector
        conn.execute("ALTER TABLE context_store.chunks ADD COLUMN tsv TSVECTOR "
                     "GENERATED ALWAYS AS (to_tsvector('english', text)) STORED")
        conn.execute("UPDATE context_store.chunks SET terms = '{}', n_terms = 0")
        conn.execute("DELETE FROM context_store.keyword_stats")
    with ContextStore(url, embed=HashedNgramEmbedder(), chunk_size=12, chunk_overlap=3) as store:
        assert {h.chunk_id: h.score for h in store.search("bees dance at night", k=50, mode="keyword")} == expected
        assert len(expected) > 2 and not query(store, "SELECT 1 FROM information_schema.columns "
                                                      "WHERE table_name = 'chunks' AND column_name = 'tsv'")
