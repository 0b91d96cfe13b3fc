"""`rocmforge context ...` through click's CliRunner (hashed embedder: no model needed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from context_store import ContextStore
from rocmforge.cli.context import bundled_docs_dir
from rocmforge.cli.main import cli
from rocmforge.embedder import HashedNgramEmbedder


@pytest.fixture()
def run(tmp_path: Path):
    db = tmp_path / "ctx.db"

    def invoke(*args: str, input: str | None = None, ok: bool = True):
        result = CliRunner().invoke(cli, ["context", "--db", str(db), "--embedder", "hashed", *args], input=input)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    invoke.db = db
    return invoke


def test_add_files_folder_text_and_stdin_then_list_and_stats(run, tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("Alpha notes about lanterns.")
    (folder / "sub" / "b.txt").write_text("Beta notes about harbors.")
    (folder / "skip.bin").write_text("not matched by the globs")
    single = tmp_path / "c.txt"
    single.write_text("Gamma notes about meadows.")
    out = run("add", str(folder), str(single), "-c", "inline words", "-", input="from stdin\n").output
    assert "added 5 document(s)" in out
    again = run("add", str(single)).output
    assert "added 0 document(s)" in again and "skipped 1" in again
    listing = [json.loads(line) for line in run("list", "--json").output.splitlines()]
    sources = {d["source"] for d in listing}
    assert sources == {str((folder / "a.md").resolve()), str((folder / "sub" / "b.txt").resolve()),
                       str(single.resolve()), "<text>", "<stdin>"}
    stats = json.loads(run("stats", "--json").output)
    assert stats["documents"] == 5 and stats["index_live"] == stats["chunks"] == 5


def test_search_ndjson_matches_the_store(run, tmp_path: Path) -> None:
    run("add", "--bundled-docs", "--chunk-size", "60", "--overlap", "10")
    lines = run("search", "reciprocal rank fusion", "-k", "3", "--json").output.splitlines()
    hits = [json.loads(line) for line in lines]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["source"] == "rocmforge/docs/context-store.md"  # not where rocmforge is installed
    with ContextStore(run.db, embed=HashedNgramEmbedder()) as store:
        direct = store.search("reciprocal rank fusion", k=3)
        assert [h["chunk_id"] for h in hits] == [h.chunk_id for h in direct]
        doc = store.get(hits[0]["document_id"])
        assert doc.content[hits[0]["start"]:hits[0]["end"]] == hits[0]["text"]
    keyword = [json.loads(x) for x in run("search", "BM25", "--mode", "keyword", "--json").output.splitlines()]
    assert keyword and all("bm25" in h["text"].lower() for h in keyword)
    text_out = run("search", "GELU", "-k", "1").output
    assert text_out.startswith("1. ") and "embeddings.md" in text_out


def test_show_rm_reindex_vacuum(run) -> None:
    run("add", "-c", "first document here", "-c", "second document there", "-m", "team=a")
    shown = run("show", "1").output
    assert "first document here" in shown and '"team": "a"' in shown
    assert "--- chunk 0 [0:19]" in run("show", "1", "--chunks").output
    assert run("rm", "1").output.strip() == "deleted 1 document(s)"
    assert run("search", "first", "--mode", "keyword").output == ""
    assert "index rebuilt: 1 vectors" in run("reindex").output
    assert " -> " in run("vacuum").output
    assert json.loads(run("stats", "--json").output)["documents"] == 1


def test_errors_are_one_line_and_nonzero(run, tmp_path: Path) -> None:
    cases = [
        (("rm", "42"), "no document with id 42"),
        (("show", "42"), "no document with id 42"),
        (("add", str(tmp_path / "missing.txt")), "no such file or folder"),
        (("add",), "nothing to add"),
        (("add", "-c", "x", "--chunk-size", "4", "--overlap", "4"), "--overlap (4) must be smaller"),
        (("add", "-c", "x", "-m", "novalue"), "key=value"),
    ]
    for args, message in cases:
        result = run(*args, ok=False)
        assert result.exit_code != 0, args
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_store_built_by_another_embedder_is_refused(run) -> None:
    run("add", "-c", "hashed vectors")
    result = CliRunner().invoke(cli, ["context", "--db", str(run.db), "--embedder", "minilm", "stats"])
    if "minilm" in result.output and "not cached" in result.output:
        pytest.skip("MiniLM not cached")
    assert result.exit_code == 1
    assert "embedded with hashed-ngram-384, not minilm-l6" in result.output


def test_bundled_docs_ship_with_the_package() -> None:
    names = sorted(p.name for p in bundled_docs_dir().glob("*.md"))
    assert "context-store.md" in names and len(names) >= 4


def test_migrate_copies_a_sqlite_store_into_postgres(run, local_postgres) -> None:
    run("add", "--bundled-docs", "--chunk-size", "60", "--overlap", "10", "-m", "team=docs")
    run("add", "-c", "a note in another collection", "--collection", "notes")
    run("rm", "2")  # a gap in the ids must survive the copy
    url = local_postgres.new_database()
    assert "copied" in run("migrate", "--to", url).output
    embed = HashedNgramEmbedder()
    with ContextStore(run.db, embed=embed) as lite, ContextStore(url, embed=embed) as pg:
        assert [d.__dict__ for d in pg.list()] == [d.__dict__ for d in lite.list()]
        for doc in lite.list():
            assert pg.chunks(doc.id) == lite.chunks(doc.id)
        for query in ("reciprocal rank fusion", "how are deletes compacted", "GELU"):
            want = lite.search(query, k=5, mode="vector")
            got = pg.search(query, k=5, mode="vector")
            assert [h.chunk_id for h in got] == [h.chunk_id for h in want]
            np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-6)
        assert pg.search("note", k=3, filters={"collection": "notes"})[0].collection == "notes"
        added = pg.add_text("written after the copy", source="new.txt")  # ids continue after the copied ones
        assert added.document_id > max(d.id for d in lite.list())
    again = run("migrate", "--to", url, ok=False)
    assert again.exit_code == 1 and "already holds documents" in again.output


def test_the_cli_works_on_a_postgres_store(local_postgres) -> None:
    url = local_postgres.new_database()

    def invoke(*args: str) -> str:
        result = CliRunner().invoke(cli, ["context", "--db", url, "--embedder", "hashed", *args])
        assert result.exit_code == 0, result.output
        return result.output

    assert "added 2 document(s)" in invoke("add", "-c", "owls hunt at night", "-c", "bees dance for nectar")
    hits = [json.loads(line) for line in invoke("search", "nectar", "--json").splitlines()]
    assert hits[0]["text"] == "bees dance for nectar"
    stats = json.loads(invoke("stats", "--json"))
    assert stats["documents"] == 2 and stats["location"] == url
    assert "index rebuilt: 2 vectors" in invoke("reindex")
    refused = CliRunner().invoke(cli, ["context", "--db", url, "--embedder", "hashed", "migrate", "--to", url])
    assert refused.exit_code == 1 and "copies a SQLite --db" in refused.output
