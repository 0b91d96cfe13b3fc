"""The context store under threads, several processes, and kill -9, on both backends (SQLite + HNSW and
PostgreSQL + pgvector; hashed n-gram embedder: fast, deterministic)."""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from context_store import ContextStore
from rocmforge.embedder import HashedNgramEmbedder
from store_backends import is_sqlite, stored_chunk_ids

WORDS = "river stone cloud ember maple quartz harbor lantern meadow cobalt willow falcon".split()


def _text(tag: str, n_words: int = 30) -> str:
    rng = random.Random(tag)
    return f"{tag} " + " ".join(rng.choice(WORDS) for _ in range(n_words))


def _assert_findable(store: ContextStore, doc_id: int, text: str) -> None:
    doc = store.get(doc_id)
    assert doc is not None and doc.content == text
    first = store.chunks(doc_id)[0]  # it holds the document's unique tag
    hits = store.search(first["text"], k=3, mode="vector")
    assert hits and hits[0].chunk_id == first["id"] and hits[0].score > 0.999


def test_eight_threads_add_search_delete(store_location) -> None:
    store = ContextStore(store_location, embed=HashedNgramEmbedder(), chunk_size=16, chunk_overlap=4)
    kept: dict[int, str] = {}
    deleted: set[int] = set()
    errors: list[BaseException] = []
    record = threading.Lock()
    stop = time.monotonic() + 4.0

    def worker(n: int) -> None:
        rng = random.Random(n)
        mine: list[int] = []
        i = 0
        try:
            while time.monotonic() < stop:
                action = rng.random()
                if action < 0.45:
                    text = _text(f"thread{n}-doc{i}")
                    i += 1
                    doc_id = store.add_text(text, source=f"t{n}").document_id
                    with record:
                        kept[doc_id] = text
                    mine.append(doc_id)
                elif action < 0.6 and mine:
                    doc_id = mine.pop(rng.randrange(len(mine)))
                    assert store.delete(doc_id)
                    with record:
                        kept.pop(doc_id)
                        deleted.add(doc_id)
                else:
                    mode = rng.choice(["vector", "keyword", "hybrid"])
                    for hit in store.search(rng.choice(WORDS) + " " + rng.choice(WORDS), k=5, mode=mode):
                        assert hit.text and hit.source.startswith("t")
        except BaseException as exc:  # noqa: BLE001 - every error counts as a failure
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(kept) > 40 and deleted  # the run really mixed adds and deletes
    for doc_id, text in kept.items():
        _assert_findable(store, doc_id, text)
    for doc_id in deleted:
        assert store.get(doc_id) is None
    stored = stored_chunk_ids(store)
    assert stored == {c["id"] for doc_id in kept for c in store.chunks(doc_id)}
    if is_sqlite(store):
        assert store.backend.index.live == stored
    store.close()
    with ContextStore(store_location, embed=HashedNgramEmbedder(), chunk_size=16, chunk_overlap=4) as again:
        assert len(again) == len(stored)
        if is_sqlite(again):
            assert again.backend.index.live == stored


def _process_writer(path: str, name: str, n_docs: int, done: "multiprocessing.Barrier", results) -> None:
    store = ContextStore(path, embed=HashedNgramEmbedder())
    written = {}
    for i in range(n_docs):
        text = _text(f"{name}-doc{i}")
        written[store.add_text(text, source=name).document_id] = text
        store.search(_text(f"probe{i}", 3), k=3)  # read while the other process writes
    done.wait(timeout=60)  # both have written everything; no reopen from here on
    found = 0
    for source in ("procA", "procB"):
        for i in range(n_docs):
            text = _text(f"{source}-doc{i}")
            hits = store.search(text, k=1, mode="vector")
            found += bool(hits) and hits[0].text == text and hits[0].source == source
    # SQLite: the process's own HNSW index caught up with the other's commits without reopening
    results.put((name, found, len(store.backend.index) if hasattr(store.backend, "index") else len(store)))
    store.close()


def test_two_processes_write_and_read_one_store(store_location) -> None:
    path = store_location
    reader = ContextStore(path, embed=HashedNgramEmbedder())  # opened before anything is written
    ctx = multiprocessing.get_context("spawn")
    done, results = ctx.Barrier(2), ctx.Queue()
    n_docs = 25
    procs = [ctx.Process(target=_process_writer, args=(str(path), name, n_docs, done, results))
             for name in ("procA", "procB")]
    for p in procs:
        p.start()
    outcome = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sorted(outcome) == [("procA", 2 * n_docs, 2 * n_docs), ("procB", 2 * n_docs, 2 * n_docs)]
    # the parent's store saw both processes' commits without reopening
    for source in ("procA", "procB"):
        text = _text(f"{source}-doc{n_docs - 1}")
        assert reader.search(text, k=1, mode="vector")[0].text == text
    assert len(stored_chunk_ids(reader)) == len(reader) == 2 * n_docs
    if is_sqlite(reader):
        assert reader.backend.index.live == stored_chunk_ids(reader)
    reader.close()


CHILD = textwrap.dedent("""
    import sys, time
    from context_store import ContextStore
    from rocmforge.embedder import HashedNgramEmbedder

    path, n_before_hang = sys.argv[1], int(sys.argv[2])
    store = ContextStore(path, embed=HashedNgramEmbedder(), chunk_size=8, chunk_overlap=2)
    backend = type(store.backend)
    real_insert = backend._insert
    count = 0

    def insert(self, tx, doc, *args):
        # called inside the document's transaction: its rows go in, then it hangs before COMMIT
        doc_id = real_insert(self, tx, doc, *args)
        if count == n_before_hang:
            print("in-transaction", flush=True)
            time.sleep(60)
        return doc_id

    backend._insert = insert
    for i in range(1000):
        text = f"doc{i} " + " ".join(f"w{i}x{j}" for j in range(40))
        result = store.add_text(text, source=f"s{i}")
        print(f"ack {result.document_id} {i}", flush=True)  # acknowledged: add_text returned
        count += 1
        if i == 5:
            store.save()  # a saved index that later commits make stale
""")


def test_kill_9_mid_ingest_loses_no_acknowledged_write(store_location, tmp_path: Path) -> None:
    path = store_location
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), str(path), "12"], stdout=subprocess.PIPE, text=True)
    acknowledged: dict[int, int] = {}
    for line in child.stdout:
        if line.startswith("ack"):
            _, doc_id, i = line.split()
            acknowledged[int(doc_id)] = int(i)
        elif line.startswith("in-transaction"):
            break
    os.kill(child.pid, signal.SIGKILL)  # mid-transaction: document 12's rows are written, not committed
    child.wait()
    assert child.returncode == -signal.SIGKILL and len(acknowledged) == 12

    with ContextStore(path, embed=HashedNgramEmbedder(), chunk_size=8, chunk_overlap=2) as store:
        docs = store.list()
        assert sorted(d.id for d in docs) == sorted(acknowledged)  # all acknowledged, nothing half-written
        for doc_id, i in acknowledged.items():
            text = f"doc{i} " + " ".join(f"w{i}x{j}" for j in range(40))
            _assert_findable(store, doc_id, text)
            chunks = store.chunks(doc_id)
            assert [c["ordinal"] for c in chunks] == list(range(len(chunks))) and len(chunks) == 7
        assert store.search("doc12", mode="keyword") == []
        if is_sqlite(store):
            assert store.backend.index.live == stored_chunk_ids(store)
        assert store.search("w3x7", k=1, mode="keyword")[0].source == "s3"


WRITER = textwrap.dedent("""
    import sys
    from context_store import ContextStore
    from rocmforge.embedder import HashedNgramEmbedder

    store = ContextStore(sys.argv[1], embed=HashedNgramEmbedder(), chunk_size=8, chunk_overlap=2)
    for i in range(100000):
        text = f"doc{i} " + " ".join(f"w{i}x{j}" for j in range(40))
        print(f"ack {store.add_text(text, source=f's{i}').document_id} {i}", flush=True)
""")


def test_kill_9_of_the_postgres_server_loses_no_acknowledged_write(local_postgres, tmp_path: Path) -> None:
    """The server itself dies mid-ingest (power loss, OOM killer): after a restart every acknowledged document
    is there whole, and nothing half-written is."""
    from context_store.local_postgres import LocalPostgres

    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    with LocalPostgres() as server:  # its own server: the session's keeps serving the other tests
        child = subprocess.Popen([sys.executable, str(script), server.url], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True)
        acknowledged: dict[int, int] = {}
        for line in child.stdout:
            _, doc_id, i = line.split()
            acknowledged[int(doc_id)] = int(i)
            if len(acknowledged) == 15:
                server.kill()
                break
        acknowledged.update({int(d): int(i) for _, d, i in (line.split() for line in child.stdout)})
        child.wait(timeout=60)
        assert child.returncode != 0  # its next write failed: the server was gone
        server.start()
        with ContextStore(server.url, embed=HashedNgramEmbedder(), chunk_size=8, chunk_overlap=2) as store:
            docs = store.list()
            assert {d.id for d in docs} >= set(acknowledged)
            assert len(docs) <= len(acknowledged) + 1  # at most the one in flight, committed but not yet printed
            for doc in docs:
                assert doc.n_chunks == 7 and [c["ordinal"] for c in store.chunks(doc.id)] == list(range(7))
            for doc_id, i in acknowledged.items():
                _assert_findable(store, doc_id, f"doc{i} " + " ".join(f"w{i}x{j}" for j in range(40)))


def test_second_handle_sees_adds_deletes_and_compaction_without_reopening(store_location) -> None:
    path = store_location
    reader = ContextStore(path, embed=HashedNgramEmbedder())
    writer = ContextStore(path, embed=HashedNgramEmbedder())  # its own connections, index and file lock
    ids = [writer.add_text(_text(f"shared-doc{i}"), source=f"s{i}").document_id for i in range(6)]
    assert reader.search(_text("shared-doc4"), k=1, mode="vector")[0].document_id == ids[4]
    writer.delete(ids[4])
    assert all(h.document_id != ids[4] for h in reader.search(_text("shared-doc4"), k=6, mode="vector"))
    assert ids[4] not in {d.id for d in reader.list()} and len(reader) == 5
    writer.delete(ids[0])
    writer.vacuum()  # cuts the deletion log: the reader must reload the compacted index or rebuild
    hits = reader.search(_text("shared-doc2"), k=6, mode="vector")
    assert hits[0].document_id == ids[2] and {h.document_id for h in hits} == set(ids[1:4] + ids[5:])
    if is_sqlite(reader):
        assert reader.backend.index.live == stored_chunk_ids(reader) and not reader.backend.index.deleted
        assert reader.backend.index.epoch == writer.backend.index.epoch == 1
    writer.close()
    reader.close()
