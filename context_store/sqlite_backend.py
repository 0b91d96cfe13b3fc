"""The store on one SQLite file (``db.py``, the truth) with an HNSW index beside it (``index.py``, the fast path).

Safe to share between threads (per-thread SQLite connections, a readers–writer lock on the index) and between
processes (writers take a file lock; readers catch up when SQLite's generation moves). Every write is one
transaction committed before it returns, so an acknowledged write survives ``kill -9`` and an interrupted one
leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import sqlite_utils
from filelock import FileLock

from context_store.db import StoreDB
from context_store.index import VectorIndex
from context_store.records import ContextStoreError, Document, NewDocument, StoredDocument
from context_store.search import EXACT_SEARCH_LIMIT, cosine_top_k, fts_query, where_clause


class SQLiteBackend:
    """``ContextStore``'s storage on a file path (see ``context_store.store`` for the shared logic)."""

    def __init__(self, path: str | os.PathLike, dim: int, *, M: int, ef_construction: int, ef: int):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.location = str(self.path)
        self._thread_lock = threading.Lock()
        self._file_lock = FileLock(str(self.path) + ".lock", thread_local=False)
        try:
            self.db = StoreDB(self.path)
        except sqlite3.DatabaseError as exc:
            raise ContextStoreError(f"{self.path} is not a context store: {exc}") from exc
        self.index = VectorIndex(self.db, dim, M=M, ef_construction=ef_construction, ef=ef)
        self._opened = False  # an index never opened (a refused embedder) is never saved

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Writers, in this process and in others, go one at a time."""
        with self._thread_lock, self._file_lock:
            yield

    def claim_embedder(self, dim: int, name: str) -> tuple[int, str]:
        """Record (dim, embedder) if the store has none yet; return what the store holds."""
        with self._writing(), self.db.transaction() as tx:
            meta = self.db.meta()
            if "dim" not in meta:
                self.db.set_meta(tx, dim=dim, embedder=name)
                return dim, name
            return int(meta["dim"]), meta["embedder"]

    def open(self) -> None:
        """Load the saved index (or rebuild it) and reconcile it with SQLite."""
        self.index.open()
        self._opened = True

    # -- writing -----------------------------------------------------------------------------------
    def find_documents(self, collection: str, content_hashes: list[str]) -> dict[str, int]:
        """Content hash -> id of the documents of ``collection`` already stored with that content."""
        found = {h: self.db.document_by_hash(self.db.db, collection, h) for h in set(content_hashes)}
        return {h: i for h, i in found.items() if i is not None}

    def insert_documents(self, docs: list[NewDocument]) -> list[int | None]:
        """One transaction; a document another writer stored meanwhile gives None."""
        ids: list[int | None] = []
        with self._writing(), self.db.transaction() as tx:
            for doc in docs:
                if self.db.document_by_hash(tx, doc.collection, doc.content_hash) is not None:
                    ids.append(None)
                else:
                    ids.append(self._insert(tx, doc))
        self.index.sync()
        return ids

    def _insert(self, tx: sqlite_utils.Database, doc: NewDocument) -> int:
        return self.db.insert_document(tx, doc.collection, doc.source, doc.content, doc.content_hash,
                                       doc.metadata, doc.chunks, doc.headings or [""] * len(doc.chunks),
                                       doc.embeddings)

    def delete_document(self, document_id: int) -> bool:
        with self._writing(), self.db.transaction() as tx:
            if tx.execute("SELECT 1 FROM documents WHERE id = ?", (document_id,)).fetchone() is None:
                return False
            self.db.delete_document(tx, document_id)
        self.index.sync()
        return True

    # -- searching ---------------------------------------------------------------------------------
    def nearest(self, query: np.ndarray, k: int, filters: dict[str, Any] | None) -> list[tuple[int, float]]:
        """(chunk id, cosine) of the k nearest chunks passing ``filters``: HNSW, exact for small filtered sets."""
        self.index.sync()
        where, params = where_clause(filters)
        allowed = set(self.db.filtered_chunk_ids(where, params)) if filters else None
        if allowed is not None and len(allowed) <= EXACT_SEARCH_LIMIT:
            ids = sorted(allowed)
            return cosine_top_k(query, ids, self.db.embeddings_of(ids), k)
        try:
            return self.index.query(query, k, allowed.__contains__ if allowed is not None else None)
        except RuntimeError:
            # hnswlib could not gather k neighbours (many deletions or a strict filter): answer exactly.
            ids = sorted(allowed) if allowed is not None else self.db.filtered_chunk_ids("1 = 1", [])
            return cosine_top_k(query, ids, self.db.embeddings_of(ids), k)

    def keyword(self, query: str, k: int, filters: dict[str, Any] | None,
                among: list[int] | None = None) -> list[tuple[int, float]]:
        """FTS5 BM25 (text and heading), flipped so higher is better like every other score here; ``among``: only
        these chunk ids."""
        match = fts_query(query)
        if not match:
            return []
        where, params = where_clause(filters)
        if among is not None:
            where, params = f"{where} AND c.id IN ({','.join('?' * len(among))})", [*params, *among]
        return [(i, -bm25) for i, bm25 in self.db.keyword(match, where, params, k)]

    def embeddings(self, chunk_ids: list[int]) -> tuple[list[int], np.ndarray]:
        """(the ids still stored, their vectors [n, dim])."""
        rows = self.db.db.execute(f"SELECT id, embedding FROM chunks WHERE id IN ({','.join('?' * len(chunk_ids))})",
                                  chunk_ids).fetchall()
        vectors = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows]) if rows else np.zeros((0, 0))
        return [r[0] for r in rows], vectors

    def hits(self, chunk_ids: list[int]) -> dict[int, dict[str, Any]]:
        rows = self.db.hits(chunk_ids)
        return {i: {**row, "metadata": json.loads(row["metadata"])} for i, row in rows.items()}

    # -- reading -----------------------------------------------------------------------------------
    def documents(self, document_id: int | None = None, collection: str | None = None, with_content: bool = False,
                  limit: int | None = None) -> list[Document]:
        where, params = ["1 = 1"], []
        if document_id is not None:
            where.append("d.id = ?")
            params.append(document_id)
        if collection is not None:
            where.append("col.name = ?")
            params.append(collection)
        sql = f"""SELECT d.id, d.source, col.name AS collection, d.content_hash, d.metadata, d.created_at,
                         {'d.content' if with_content else 'NULL'} AS content,
                         (SELECT count(*) FROM chunks c WHERE c.document_id = d.id) AS n_chunks
                  FROM documents d JOIN collections col ON col.id = d.collection_id
                  WHERE {' AND '.join(where)} ORDER BY d.id {'LIMIT ' + str(int(limit)) if limit else ''}"""
        return [Document(r["id"], r["source"], r["collection"], r["content_hash"], json.loads(r["metadata"]),
                         r["created_at"], r["n_chunks"], r["content"]) for r in self.db.db.query(sql, params)]

    def chunks(self, document_id: int) -> list[dict[str, Any]]:
        return list(self.db.db.query('SELECT id, ordinal, text, start, "end", n_tokens, heading FROM chunks '
                                     "WHERE document_id = ? ORDER BY ordinal", [document_id]))

    def count_chunks(self) -> int:
        return self.db.db.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def stats(self) -> dict[str, Any]:
        self.index.sync()
        one = lambda sql: self.db.db.execute(sql).fetchone()[0]  # noqa: E731
        meta = self.db.meta()
        return {"path": str(self.path), "documents": one("SELECT count(*) FROM documents"),
                "chunks": one("SELECT count(*) FROM chunks"), "collections": one("SELECT count(*) FROM collections"),
                "index_live": len(self.index), "index_marked_deleted": len(self.index.deleted),
                "embedder": meta["embedder"], "generation": int(meta["generation"]), "epoch": int(meta["epoch"]),
                "db_bytes": self._db_bytes(), "index_bytes": sum(p.stat().st_size for p in self.index.files())}

    def _db_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.path, Path(str(self.path) + "-wal")) if p.exists())

    def export(self) -> Iterator[StoredDocument]:
        """Every document with its chunks and vectors, in id order (one snapshot)."""
        with self.db.snapshot() as db:
            for d in list(db.query("""SELECT d.*, col.name AS collection FROM documents d
                                      JOIN collections col ON col.id = d.collection_id ORDER BY d.id""")):
                rows = db.execute('SELECT id, ordinal, text, start, "end", n_tokens, heading, embedding FROM chunks '
                                  "WHERE document_id = ? ORDER BY ordinal", (d["id"],)).fetchall()
                names = ("id", "ordinal", "text", "start", "end", "n_tokens", "heading")
                chunks = [dict(zip(names, r[:7])) for r in rows]
                vectors = np.stack([np.frombuffer(r[7], dtype=np.float32) for r in rows])
                yield StoredDocument(d["id"], d["collection"], d["source"], d["content"], d["content_hash"],
                                     json.loads(d["metadata"]), d["created_at"], d["updated_at"], chunks, vectors)

    # -- maintenance -------------------------------------------------------------------------------
    def reembed(self, embed: Callable[[list[str]], np.ndarray], dim: int, name: str) -> None:
        """Re-embed every chunk, record the new embedder, rebuild the index."""
        with self._writing():
            with self.db.transaction() as tx:
                rows = tx.execute("SELECT id, text FROM chunks ORDER BY id").fetchall()
                for start in range(0, len(rows), 256):
                    part = rows[start:start + 256]
                    vectors = embed([text for _, text in part])
                    tx.conn.executemany("UPDATE chunks SET embedding = ? WHERE id = ?",
                                        [(v.tobytes(), i) for (i, _), v in zip(part, vectors)])
                self.db.set_meta(tx, dim=dim, embedder=name)
                self.db.bump(tx, "epoch")  # every vector changed: other processes must rebuild
            self.index.rebuild()
            self.index.save()
        self._opened = True

    def reindex(self) -> int:
        """Rebuild the HNSW index from SQLite; returns how many vectors it holds."""
        with self._writing():
            self.index.rebuild()
            self.index.save()
        return len(self.index)

    def vacuum(self) -> dict[str, int]:
        """Drop deleted vectors from the index, optimise FTS, VACUUM SQLite. Returns sizes in bytes."""
        before = self._db_bytes() + sum(p.stat().st_size for p in self.index.files())
        with self._writing():
            with self.db.transaction() as tx:
                tx.execute("DELETE FROM deleted_chunks")
                tx.execute("INSERT INTO chunks_fts(chunks_fts) VALUES ('optimize')")
                self.db.bump(tx, "epoch")  # the deletion log is gone: other processes reload or rebuild
            self.index.rebuild()
            self.index.save()
            self.db.db.execute("VACUUM")
            self.db.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        after = self._db_bytes() + sum(p.stat().st_size for p in self.index.files())
        return {"bytes_before": before, "bytes_after": after}

    def save(self) -> None:
        """Persist the HNSW index now (it is also saved on close; SQLite never needs this)."""
        with self._writing():
            self.index.save()

    def close(self) -> None:
        if self._opened:
            self.save()
        self.db.close()
