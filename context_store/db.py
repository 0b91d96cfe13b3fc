"""The SQLite side of the store: the source of truth that the HNSW index is derived from.

Tables: ``meta`` (dim, embedder, generation, epoch), ``collections``, ``documents`` (source, content,
content hash, metadata JSON, timestamps), ``chunks`` (text, offsets, float32 embedding blob, heading: the
document's title and section path), ``chunks_fts`` (FTS5 over text and heading, Porter-stemmed, kept in step by
triggers; older stores are migrated on open) and ``deleted_chunks`` (a log of
deleted chunk ids, so other processes can drop them from their index).

Chunk ids come from ``AUTOINCREMENT``: never reused, and since writers are serialised they are
committed in increasing order, so "every chunk with id > n" is exactly what an index built up to
chunk ``n`` is missing. Each write bumps ``generation``; compaction bumps ``epoch``.

Each thread gets its own connection (WAL mode, busy timeout): a ``sqlite_utils.Database`` is bound
to the thread that created it.
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import sqlite_utils

from context_store.connections import ThreadConnections
from context_store.keyword_terms import FTS_TOKENIZE, FTS_WEIGHTS

BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS collections (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id INTEGER NOT NULL REFERENCES collections(id),
    source TEXT NOT NULL,
    content TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (collection_id, content_hash));
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    n_tokens INTEGER NOT NULL,
    embedding BLOB NOT NULL,
    heading TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS chunks_document ON chunks(document_id);
CREATE TABLE IF NOT EXISTS deleted_chunks (seq INTEGER PRIMARY KEY AUTOINCREMENT, chunk_id INTEGER NOT NULL);
"""

# The keyword index: chunk text and heading (title and section path), Porter-stemmed. A store made with another
# definition (older stores indexed text alone, some without stemming) gets this one on open, rebuilt from chunks.
_FTS = f"""
CREATE VIRTUAL TABLE chunks_fts USING fts5(
    text, heading, content='chunks', content_rowid='id', tokenize='{FTS_TOKENIZE}');
CREATE TRIGGER chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text, heading) VALUES (new.id, new.text, new.heading);
END;
CREATE TRIGGER chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text, heading) VALUES ('delete', old.id, old.text, old.heading);
END;
"""

# Columns of a search hit, joined from chunks and documents.
HIT_COLUMNS = """c.id AS chunk_id, c.document_id, c.ordinal, c.text, c.start, c."end", c.heading,
    d.source, d.metadata, col.name AS collection"""
_DOC_JOIN = "JOIN documents d ON d.id = c.document_id JOIN collections col ON col.id = d.collection_id"
_HIT_JOIN = f"chunks c {_DOC_JOIN}"


class StoreDB:
    """Thread-local connections to one SQLite file, plus the queries the store needs."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._connections = ThreadConnections(self._connect)
        with self.transaction() as db:
            for statement in _split_sql(_SCHEMA):
                db.execute(statement)
            _migrate(db)
            for key, value in (("generation", "0"), ("epoch", "0")):
                db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- connections and transactions -------------------------------------------------------------
    @property
    def db(self) -> sqlite_utils.Database:
        """This thread's connection."""
        return self._connections.get()

    def _connect(self) -> sqlite_utils.Database:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is on disk before add_document returns, so acknowledged writes survive kill -9
        # and power loss alike.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.isolation_level = None  # we issue BEGIN IMMEDIATE / COMMIT ourselves
        return sqlite_utils.Database(conn)

    @contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """One write transaction: everything inside commits together or not at all."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")  # take the write lock now, not at the first write
        try:
            yield db
        except BaseException:
            db.conn.execute("ROLLBACK")
            raise
        db.conn.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[sqlite_utils.Database]:
        """A read transaction: everything read inside sees one committed state (a WAL snapshot)."""
        db = self.db
        db.execute("BEGIN")
        db.execute("SELECT 1 FROM meta LIMIT 1")  # the first read pins the snapshot
        try:
            yield db
        finally:
            db.conn.execute("COMMIT")

    def close(self) -> None:
        self._connections.close()

    # -- meta --------------------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, db: sqlite_utils.Database, **values: Any) -> None:
        for key, value in values.items():
            db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                       (key, str(value)))

    def bump(self, db: sqlite_utils.Database, key: str = "generation") -> None:
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = ?", (key,))

    def versions(self) -> tuple[int, int]:
        """(generation, epoch): a cheap check for other writers' commits."""
        rows = dict(self.db.execute("SELECT key, value FROM meta WHERE key IN ('generation', 'epoch')").fetchall())
        return int(rows["generation"]), int(rows["epoch"])

    # -- writes (call inside transaction()) --------------------------------------------------------
    def collection_id(self, db: sqlite_utils.Database, name: str) -> int:
        db.execute("INSERT OR IGNORE INTO collections(name, created_at) VALUES (?, ?)", (name, time.time()))
        return db.execute("SELECT id FROM collections WHERE name = ?", (name,)).fetchone()[0]

    def document_by_hash(self, db: sqlite_utils.Database, collection: str, content_hash: str) -> int | None:
        row = db.execute("""SELECT d.id FROM documents d JOIN collections col ON col.id = d.collection_id
                            WHERE col.name = ? AND d.content_hash = ?""", (collection, content_hash)).fetchone()
        return row[0] if row else None

    def insert_document(self, db: sqlite_utils.Database, collection: str, source: str, content: str,
                        content_hash: str, metadata: dict, chunks: list, headings: list[str],
                        embeddings: np.ndarray) -> int:
        now = time.time()
        doc_id = db["documents"].insert({
            "collection_id": self.collection_id(db, collection), "source": source, "content": content,
            "content_hash": content_hash, "metadata": json.dumps(metadata, sort_keys=True),
            "created_at": now, "updated_at": now}).last_pk
        db["chunks"].insert_all(
            {"document_id": doc_id, "ordinal": i, "text": c.text, "start": c.start, "end": c.end,
             "n_tokens": c.n_tokens, "embedding": np.ascontiguousarray(vec, dtype=np.float32).tobytes(),
             "heading": heading}
            for i, (c, heading, vec) in enumerate(zip(chunks, headings, embeddings)))
        self.bump(db)
        return doc_id

    def delete_document(self, db: sqlite_utils.Database, doc_id: int) -> list[int]:
        chunk_ids = [r[0] for r in db.execute("SELECT id FROM chunks WHERE document_id = ?", (doc_id,))]
        db.execute("INSERT INTO deleted_chunks(chunk_id) SELECT id FROM chunks WHERE document_id = ?", (doc_id,))
        db.execute("DELETE FROM chunks WHERE document_id = ?", (doc_id,))
        db.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
        self.bump(db)
        return chunk_ids

    # -- reads -------------------------------------------------------------------------------------
    def chunks_after(self, seq: int, batch: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(chunk ids, embeddings) of every chunk with id > seq, in id order, in batches."""
        while True:
            rows = self.db.execute("SELECT id, embedding FROM chunks WHERE id > ? ORDER BY id LIMIT ?",
                                   (seq, batch)).fetchall()
            if not rows:
                return
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            yield ids, np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
            seq = int(ids[-1])

    def deleted_after(self, seq: int) -> list[tuple[int, int]]:
        return self.db.execute("SELECT seq, chunk_id FROM deleted_chunks WHERE seq > ? ORDER BY seq",
                               (seq,)).fetchall()

    def chunk_summary(self) -> tuple[int, int, int]:
        """(number of chunks, largest chunk id, last deletion seq)."""
        count, last = self.db.execute("SELECT count(*), coalesce(max(id), 0) FROM chunks").fetchone()
        (last_deleted,) = self.db.execute("SELECT coalesce(max(seq), 0) FROM deleted_chunks").fetchone()
        return count, last, last_deleted

    def hits(self, chunk_ids: list[int]) -> dict[int, dict]:
        """Rows for these chunk ids (missing ids were deleted meanwhile and are left out)."""
        out: dict[int, dict] = {}
        for start in range(0, len(chunk_ids), 500):
            part = chunk_ids[start:start + 500]
            marks = ",".join("?" * len(part))
            for row in self.db.query(f"SELECT {HIT_COLUMNS} FROM {_HIT_JOIN} WHERE c.id IN ({marks})", part):
                out[row["chunk_id"]] = row
        return out

    def filtered_chunk_ids(self, where: str, params: list) -> list[int]:
        return [r[0] for r in self.db.execute(f"SELECT c.id FROM {_HIT_JOIN} WHERE {where}", params)]

    def embeddings_of(self, chunk_ids: list[int]) -> np.ndarray:
        vectors = []
        for start in range(0, len(chunk_ids), 500):
            part = chunk_ids[start:start + 500]
            marks = ",".join("?" * len(part))
            rows = dict(self.db.execute(f"SELECT id, embedding FROM chunks WHERE id IN ({marks})", part).fetchall())
            vectors.extend(np.frombuffer(rows[i], dtype=np.float32) for i in part if i in rows)
        return np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)

    def keyword(self, match: str, where: str, params: list, limit: int) -> list[tuple[int, float]]:
        """FTS5 BM25 ranking: (chunk id, bm25) best first (SQLite's bm25 is lower-is-better)."""
        weights = ", ".join(str(FTS_WEIGHTS[column]) for column in ("text", "heading"))
        sql = f"""SELECT c.id, bm25(chunks_fts, {weights}) AS rank FROM chunks_fts
                  JOIN chunks c ON c.id = chunks_fts.rowid {_DOC_JOIN}
                  WHERE chunks_fts MATCH ? AND {where} ORDER BY rank LIMIT ?"""
        return [(r[0], r[1]) for r in self.db.execute(sql, [match, *params, limit])]


def _migrate(db: sqlite_utils.Database) -> None:
    """Bring an older store's schema up to date (inside the opening transaction, so one process does it)."""
    if "heading" not in {row[1] for row in db.execute("PRAGMA table_info(chunks)")}:
        db.execute("ALTER TABLE chunks ADD COLUMN heading TEXT NOT NULL DEFAULT ''")
    row = db.execute("SELECT sql FROM sqlite_master WHERE name = 'chunks_fts'").fetchone()
    wanted = _split_sql(_FTS)
    if row is not None and " ".join(row[0].split()) == " ".join(wanted[0].split()):
        return
    for trigger in ("chunks_ai", "chunks_ad"):
        db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
    db.execute("DROP TABLE IF EXISTS chunks_fts")
    for statement in wanted:
        db.execute(statement)
    db.execute("INSERT INTO chunks_fts(chunks_fts) VALUES ('rebuild')")


def _split_sql(script: str) -> list[str]:
    """Statements of a schema script, one by one (``executescript`` would commit our transaction)."""
    statements, buffer = [], ""
    for line in script.strip().splitlines():
        buffer += line + "\n"
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    return statements
