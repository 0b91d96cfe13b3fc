"""ContextStore: documents in SQLite, their chunk vectors in HNSW, searched by vector, keyword or both.

Safe to share between threads (per-thread SQLite connections, a readers–writer lock on the index)
and between processes (writers take a file lock; readers catch up when SQLite's generation moves).
Every document is one transaction committed before ``add_text`` returns, so an acknowledged
write survives ``kill -9`` and an interrupted one leaves nothing behind.

>>> import tempfile, os
>>> from rocmforge.embedder import HashedNgramEmbedder
>>> folder = tempfile.mkdtemp()
>>> with ContextStore(os.path.join(folder, "ctx.db"), embed=HashedNgramEmbedder()) as store:
...     doc = store.add_text("Cats purr when they are content.", source="cats.txt")
...     store.search("why do cats purr", k=1)[0].source
'cats.txt'
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
from filelock import FileLock

from context_store.chunk import TokenSpans, chunk_text
from context_store.db import StoreDB
from context_store.index import VectorIndex
from context_store.search import cosine_top_k, fts_query, reciprocal_rank_fusion, where_clause

log = logging.getLogger(__name__)

Embed = Callable[[list[str]], np.ndarray]
Mode = Literal["hybrid", "vector", "keyword"]

# Below this many candidate chunks a filtered vector search is exact (a matrix product beats HNSW).
EXACT_SEARCH_LIMIT = 4096


class ContextStoreError(Exception):
    """A store-level problem a user can cause: wrong embedder for this store, empty document, bad mode."""


@dataclass(frozen=True)
class AddResult:
    document_id: int
    n_chunks: int
    skipped: bool  # identical content was already in the collection


@dataclass(frozen=True)
class Hit:
    chunk_id: int
    document_id: int
    source: str
    text: str
    start: int  # character offsets of the chunk within its document
    end: int
    score: float  # the mode's own score: cosine (vector), -bm25 (keyword), fused RRF (hybrid)
    scores: dict[str, float] = field(default_factory=dict)  # every score this hit got
    metadata: dict[str, Any] = field(default_factory=dict)
    collection: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Document:
    id: int
    source: str
    collection: str
    content_hash: str
    metadata: dict[str, Any]
    created_at: float
    n_chunks: int
    content: str | None = None


class ContextStore:
    """A persistent, searchable store of text chunks. ``embed`` maps texts to vectors [n, dim].

    ``reembed=True`` re-embeds every stored chunk with ``embed`` on open (the way to switch embedders);
    otherwise opening a store built by another embedder raises ``ContextStoreError``.
    """

    def __init__(self, path: str | os.PathLike, embed: Embed, dim: int | None = None, *,
                 chunk_size: int = 200, chunk_overlap: int = 40, token_spans: TokenSpans | None = None,
                 ef: int = 128, M: int = 32, ef_construction: int = 200, reembed: bool = False):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.embed = embed
        self.embedder_name = getattr(embed, "name", None) or getattr(embed, "__name__", "custom")
        self.dim = dim or getattr(embed, "dim", None) or int(np.asarray(embed(["dimension probe"])).shape[1])
        self.chunk_size, self.chunk_overlap = chunk_size, chunk_overlap
        self.token_spans = token_spans or getattr(embed, "token_spans", None)
        self._thread_lock = threading.Lock()
        self._file_lock = FileLock(str(self.path) + ".lock", thread_local=False)
        try:
            self.db = StoreDB(self.path)
        except sqlite3.DatabaseError as exc:
            raise ContextStoreError(f"{self.path} is not a context store: {exc}") from exc
        self._check_embedder(reembed)
        self.index = VectorIndex(self.db, self.dim, M=M, ef_construction=ef_construction, ef=ef)
        if reembed:
            self.reindex(reembed=True)
        else:
            self.index.open()

    def _check_embedder(self, reembed: bool) -> None:
        with self._writing(), self.db.transaction() as tx:
            meta = self.db.meta()
            if "dim" not in meta:
                self.db.set_meta(tx, dim=self.dim, embedder=self.embedder_name)
                return
            if int(meta["dim"]) != self.dim and not reembed:
                raise ContextStoreError(f"{self.path} holds {meta['dim']}-dim vectors ({meta['embedder']}); "
                                        f"this embedder gives {self.dim} (reindex with --reembed to switch)")
            if meta["embedder"] != self.embedder_name and not reembed:
                raise ContextStoreError(f"{self.path} was embedded with {meta['embedder']}, not "
                                        f"{self.embedder_name} (reindex with --reembed to switch)")

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Writers, in this process and in others, go one at a time."""
        with self._thread_lock, self._file_lock:
            yield

    def _embed(self, texts: list[str]) -> np.ndarray:
        vectors = np.asarray(self.embed(texts), dtype=np.float32)
        if vectors.shape != (len(texts), self.dim):
            raise ContextStoreError(f"embedder returned shape {vectors.shape}, expected {(len(texts), self.dim)}")
        return vectors

    # -- writing -----------------------------------------------------------------------------------
    def add_text(self, text: str, source: str = "<text>", metadata: dict[str, Any] | None = None,
                 collection: str = "default") -> AddResult:
        """Chunk, embed and store one document; identical content already in the collection is skipped."""
        return self.add_texts([text], [source], [metadata or {}], collection)[0]

    def add_texts(self, texts: list[str], sources: list[str] | None = None,
                  metadatas: list[dict[str, Any]] | None = None, collection: str = "default") -> list[AddResult]:
        """Add several documents with one embedder call and one transaction (all of them or none)."""
        sources = sources or ["<text>"] * len(texts)
        metadatas = metadatas or [{} for _ in texts]
        hashes = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]
        results: dict[int, AddResult] = {}
        pending: dict[str, int] = {}  # content hash -> position of the first new text with it
        for i, content_hash in enumerate(hashes):
            existing = self.db.document_by_hash(self.db.db, collection, content_hash)
            if existing is not None or content_hash in pending:
                continue
            pending[content_hash] = i
        chunked = {i: chunk_text(texts[i], self.chunk_size, self.chunk_overlap, self.token_spans)
                   for i in pending.values()}
        for i, chunks in chunked.items():
            if not chunks:
                raise ContextStoreError(f"{sources[i]}: nothing to index (empty or whitespace only)")
        flat = [c.text for i in chunked for c in chunked[i]]
        vectors = self._embed(flat) if flat else np.zeros((0, self.dim), np.float32)  # slow: outside the lock
        with self._writing(), self.db.transaction() as tx:
            offset = 0
            for i, chunks in chunked.items():
                mine, offset = vectors[offset:offset + len(chunks)], offset + len(chunks)
                if self.db.document_by_hash(tx, collection, hashes[i]) is not None:
                    continue  # another writer added it while we embedded
                doc_id = self.db.insert_document(tx, collection, sources[i], texts[i], hashes[i],
                                                 metadatas[i], chunks, mine)
                results[i] = AddResult(doc_id, len(chunks), skipped=False)
            for i, content_hash in enumerate(hashes):  # duplicates, of stored or of earlier texts here
                if i not in results:
                    results[i] = AddResult(self.db.document_by_hash(tx, collection, content_hash), 0, skipped=True)
        self.index.sync()
        return [results[i] for i in range(len(texts))]

    def add_document(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None,
                     collection: str = "default", source: str | None = None) -> AddResult:
        """Add a UTF-8 text file; the source is its resolved path unless ``source`` names it."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ContextStoreError(f"cannot read {path}: {exc}") from exc
        return self.add_text(text, source=source or str(path.resolve()), metadata=metadata, collection=collection)

    def delete(self, document_id: int) -> bool:
        """Delete a document, its chunks and their vectors; False when there was no such document."""
        with self._writing(), self.db.transaction() as tx:
            if tx.execute("SELECT 1 FROM documents WHERE id = ?", (document_id,)).fetchone() is None:
                return False
            self.db.delete_document(tx, document_id)
        self.index.sync()
        return True

    # -- reading -----------------------------------------------------------------------------------
    def search(self, query: str, k: int = 5, mode: Mode = "hybrid",
               filters: dict[str, Any] | None = None) -> list[Hit]:
        """The k best chunks for ``query``. Filters: collection, source (glob), document_id, metadata keys."""
        if mode not in ("hybrid", "vector", "keyword"):
            raise ContextStoreError(f"unknown search mode {mode!r}; use hybrid, vector or keyword")
        if k < 1:
            return []
        self.index.sync()
        where, params = where_clause(filters)
        pool = k if mode != "hybrid" else max(4 * k, 20)
        vector = self._vector_search(query, pool, where, params, filters) if mode != "keyword" else []
        keyword = self._keyword_search(query, pool, where, params) if mode != "vector" else []
        if mode == "vector":
            ranked = vector
        elif mode == "keyword":
            ranked = keyword
        else:
            ranked = reciprocal_rank_fusion([[i for i, _ in vector], [i for i, _ in keyword]])
        cosines, bm25s = dict(vector), dict(keyword)
        rows = self.db.hits([i for i, _ in ranked])
        hits = []
        for chunk_id, score in ranked:
            row = rows.get(chunk_id)
            if row is None:  # deleted after the index answered
                continue
            scores = {"vector": cosines.get(chunk_id), "keyword": bm25s.get(chunk_id)}
            if mode == "hybrid":
                scores["rrf"] = score
            hits.append(Hit(chunk_id, row["document_id"], row["source"], row["text"], row["start"], row["end"],
                            float(score), {n: s for n, s in scores.items() if s is not None},
                            json.loads(row["metadata"]), row["collection"]))
        return hits[:k]

    def _vector_search(self, query: str, k: int, where: str, params: list,
                       filters: dict[str, Any] | None) -> list[tuple[int, float]]:
        q = self._embed([query])[0]
        allowed = set(self.db.filtered_chunk_ids(where, params)) if filters else None
        if allowed is not None and len(allowed) <= EXACT_SEARCH_LIMIT:
            ids = sorted(allowed)
            return cosine_top_k(q, ids, self.db.embeddings_of(ids), k)
        try:
            return self.index.query(q, k, allowed.__contains__ if allowed is not None else None)
        except RuntimeError:
            # hnswlib could not gather k neighbours (many deletions or a strict filter): answer exactly.
            ids = sorted(allowed) if allowed is not None else self.db.filtered_chunk_ids("1 = 1", [])
            return cosine_top_k(q, ids, self.db.embeddings_of(ids), k)

    def _keyword_search(self, query: str, k: int, where: str, params: list) -> list[tuple[int, float]]:
        match = fts_query(query)
        # SQLite's bm25() is lower-is-better; flip it so every score here is higher-is-better.
        return [(i, -bm25) for i, bm25 in self.db.keyword(match, where, params, k)] if match else []

    def get(self, document_id: int, with_content: bool = True) -> Document | None:
        """One document (with its full text unless ``with_content=False``), or None."""
        docs = self._documents("d.id = ?", [document_id], with_content)
        return docs[0] if docs else None

    def list(self, collection: str | None = None, limit: int | None = None) -> list[Document]:
        """Documents, oldest first (without their text)."""
        where, params = ("col.name = ?", [collection]) if collection else ("1 = 1", [])
        return self._documents(where, params, False, limit)

    def _documents(self, where: str, params: list, with_content: bool, limit: int | None = None) -> list[Document]:
        sql = f"""SELECT d.id, d.source, col.name AS collection, d.content_hash, d.metadata, d.created_at,
                         {'d.content' if with_content else 'NULL'} AS content,
                         (SELECT count(*) FROM chunks c WHERE c.document_id = d.id) AS n_chunks
                  FROM documents d JOIN collections col ON col.id = d.collection_id
                  WHERE {where} ORDER BY d.id {'LIMIT ' + str(int(limit)) if limit else ''}"""
        return [Document(r["id"], r["source"], r["collection"], r["content_hash"], json.loads(r["metadata"]),
                         r["created_at"], r["n_chunks"], r["content"]) for r in self.db.db.query(sql, params)]

    def chunks(self, document_id: int) -> list[dict[str, Any]]:
        """A document's chunks in order: id, ordinal, text, start, end, n_tokens."""
        return list(self.db.db.query('SELECT id, ordinal, text, start, "end", n_tokens FROM chunks '
                                     "WHERE document_id = ? ORDER BY ordinal", [document_id]))

    def stats(self) -> dict[str, Any]:
        self.index.sync()
        one = lambda sql: self.db.db.execute(sql).fetchone()[0]  # noqa: E731
        meta = self.db.meta()
        return {"path": str(self.path), "documents": one("SELECT count(*) FROM documents"),
                "chunks": one("SELECT count(*) FROM chunks"), "collections": one("SELECT count(*) FROM collections"),
                "index_live": len(self.index), "index_marked_deleted": len(self.index.deleted),
                "dim": self.dim, "embedder": meta["embedder"], "generation": int(meta["generation"]),
                "epoch": int(meta["epoch"]), "db_bytes": self._db_bytes(),
                "index_bytes": sum(p.stat().st_size for p in self.index.files())}

    def _db_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.path, Path(str(self.path) + "-wal")) if p.exists())

    # -- maintenance -------------------------------------------------------------------------------
    def reindex(self, reembed: bool = False) -> None:
        """Rebuild the HNSW index from SQLite; with ``reembed``, first re-embed every chunk with this embedder."""
        with self._writing():
            if reembed:
                with self.db.transaction() as tx:
                    rows = tx.execute("SELECT id, text FROM chunks ORDER BY id").fetchall()
                    for start in range(0, len(rows), 256):
                        part = rows[start:start + 256]
                        vectors = self._embed([text for _, text in part])
                        tx.conn.executemany("UPDATE chunks SET embedding = ? WHERE id = ?",
                                            [(v.tobytes(), i) for (i, _), v in zip(part, vectors)])
                    self.db.set_meta(tx, dim=self.dim, embedder=self.embedder_name)
                    self.db.bump(tx, "epoch")  # every vector changed: other processes must rebuild
            self.index.rebuild()
            self.index.save()

    def vacuum(self) -> dict[str, int]:
        """Compact: drop deleted vectors from the index, optimise FTS, VACUUM SQLite. Returns sizes in bytes."""
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
        self.save()
        self.db.close()

    def __enter__(self) -> "ContextStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.db.db.execute("SELECT count(*) FROM chunks").fetchone()[0]
