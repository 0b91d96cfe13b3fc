"""Retrieval evaluation: metrics by hand, BEIR loading, the labelled sets' shape, and `rocmforge context eval`."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from context_store import ContextStore
from context_store.evaluate import Evaluation, RetrievalSet, query_metrics
from rocmforge.cli.main import cli
from rocmforge.embedder import HashedNgramEmbedder

SETS = Path(__file__).parent / "fixtures" / "retrieval"


def test_metrics_by_hand() -> None:
    m = query_metrics(["x", "a", "y", "b"], {"a", "b"})
    assert m["MRR@10"] == 0.5 and (m["R@1"], m["R@5"], m["R@10"]) == (0.0, 1.0, 1.0)
    ideal = 1 + 1 / math.log2(3)
    assert m["nDCG@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / ideal)
    assert query_metrics(["x"] * 10 + ["a"], {"a"}) == {"MRR@10": 0.0, "nDCG@10": 0.0, "R@1": 0.0, "R@5": 0.0,
                                                        "R@10": 0.0}  # rank 11 is past the cutoff
    assert query_metrics(["a"], {"a"}, n_relevant=3)["nDCG@10"] == pytest.approx(1 / (1 + 1 / math.log2(3) + 0.5))


@pytest.mark.parametrize("name", ["pydoc", "manpages"])
def test_labelled_sets_are_well_formed(name: str) -> None:
    data = RetrievalSet.load(SETS / name)
    assert len(data.queries) == 50 and len(data.corpus) > 400
    assert all(data.qrels[q] <= set(data.corpus) for q in data.queries)
    for qid, question in data.queries.items():  # paraphrased: the question is not a phrase of its passage
        for pid in data.qrels[qid]:
            assert question.lower().rstrip("?") not in data.corpus[pid]["text"].lower()


def test_missing_files_and_unlabelled_sets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a BEIR set"):
        RetrievalSet.load(tmp_path)
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text('{"_id": "p1", "text": "a passage"}\n')
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "a question"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tmissing\t1\n")
    with pytest.raises(ValueError, match="no query has a relevant passage"):
        RetrievalSet.load(tmp_path)


def test_duplicate_passages_count_as_one_document(tmp_path: Path) -> None:
    (tmp_path / "qrels").mkdir()
    passages = [{"_id": "a", "text": "owls hunt at night"}, {"_id": "b", "text": "owls hunt at night"},
                {"_id": "c", "text": "bees make honey from nectar"}]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(p) + "\n" for p in passages))
    (tmp_path / "queries.jsonl").write_text('{"_id": "q", "text": "when do owls hunt"}\n')
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\tb\t1\n")
    with ContextStore(tmp_path / "s.db", embed=HashedNgramEmbedder()) as store:
        evaluation = Evaluation(store, RetrievalSet.load(tmp_path))
        assert sorted(len(p) for p in evaluation.passages_of.values()) == [1, 2]  # a and b share a document
        for mode in ("hybrid", "rrf", "vector", "keyword"):
            assert evaluation.run(mode)["MRR@10"] == 1.0


def test_cli_eval_prints_every_mode(tmp_path: Path) -> None:
    db = tmp_path / "eval.db"
    args = ["context", "--db", str(db), "--embedder", "hashed", "eval", str(SETS / "pydoc"), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["mode"] for r in rows] == ["hybrid", "rrf", "vector", "keyword"]
    assert all(0.0 <= r[m] <= 1.0 for r in rows for m in ("MRR@10", "nDCG@10", "R@1", "R@5", "R@10"))
    assert all(r["R@1"] <= r["R@5"] <= r["R@10"] and r["queries"] == 50 for r in rows)
    again = CliRunner().invoke(cli, args)  # the store kept the passages: nothing is embedded twice
    assert [json.loads(line) for line in again.output.splitlines()] == rows
    bad = CliRunner().invoke(cli, ["context", "--embedder", "hashed", "eval", str(SETS / "pydoc"), "--modes", "x"])
    assert bad.exit_code == 1 and "unknown mode" in bad.output


@pytest.mark.parametrize("name", ["pydoc", "manpages"])
def test_cli_eval_scores_both_backends_alike(tmp_path: Path, local_postgres, name: str) -> None:
    """The issue's bar: MRR@10 within 0.01 on SQLite and PostgreSQL. Keyword ranking is the same BM25 on both
    (equal); the vector side differs only by the HNSW implementations (hnswlib, pgvector)."""
    runs = {}
    for backend, location in (("sqlite", str(tmp_path / "eval.db")), ("postgresql", local_postgres.new_database())):
        result = CliRunner().invoke(cli, ["context", "--db", location, "--embedder", "hashed", "eval",
                                          str(SETS / name), "--json"])
        assert result.exit_code == 0, result.output
        runs[backend] = {row["mode"]: row for row in map(json.loads, result.output.splitlines())}
    for mode in ("hybrid", "rrf", "vector", "keyword"):
        assert runs["postgresql"][mode]["MRR@10"] == pytest.approx(runs["sqlite"][mode]["MRR@10"], abs=0.01), mode
    assert runs["postgresql"]["keyword"] == runs["sqlite"]["keyword"]


def _eval_rows(db: Path, embedder: str, *sets: str) -> dict[tuple[str, str], dict]:
    args = ["context", "--db", str(db), "--embedder", embedder, "eval", *(str(SETS / s) for s in sets), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return {(r["set"], r["mode"]): r for r in map(json.loads, result.output.splitlines())}


# What each mode reached on 2026-12-07 with the judged labels (tests/fixtures/retrieval/judged.tsv), less a margin
# for ties that another BLAS kernel may break the other way. A drop below is a regression of the keyword side, the
# fusion or the chunking, not noise.
LEXICAL_FLOOR = {("pydoc", "hybrid"): 0.42, ("pydoc", "rrf"): 0.45, ("pydoc", "keyword"): 0.41,
                 ("manpages", "hybrid"): 0.25, ("manpages", "rrf"): 0.31, ("manpages", "keyword"): 0.43}


def test_quality_floor_with_the_lexical_embedder(tmp_path: Path) -> None:
    """Both sets with the hashed n-gram embedder (no model, a few seconds): MRR@10 per mode above its floor."""
    rows = _eval_rows(tmp_path / "lexical.db", "hashed", "pydoc", "manpages")
    for key, floor in LEXICAL_FLOOR.items():
        assert rows[key]["MRR@10"] >= floor, (key, rows[key])


@pytest.mark.slow
def test_minilm_quality_floor_on_the_held_out_set(tmp_path: Path, minilm_dir: Path) -> None:
    """The default hybrid mode with MiniLM on the held-out man pages (reached: MRR@10 0.538, R@5 0.80): it stays
    there and well ahead of keyword search alone. The issue's targets (0.80 / 0.95) are not reached yet."""
    rows = _eval_rows(tmp_path / "minilm.db", "minilm", "manpages")
    hybrid, keyword = rows["manpages", "hybrid"], rows["manpages", "keyword"]
    assert hybrid["MRR@10"] >= 0.51 and hybrid["R@5"] >= 0.76, hybrid
    assert hybrid["MRR@10"] >= keyword["MRR@10"] + 0.1 and hybrid["R@10"] >= keyword["R@10"], (hybrid, keyword)
