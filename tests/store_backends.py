"""What the context-store tests read behind a store's back, from either backend's own tables."""
from __future__ import annotations

import sqlite3

from context_store import ContextStore
from context_store.sqlite_backend import SQLiteBackend


def is_sqlite(store: ContextStore) -> bool:
    return isinstance(store.backend, SQLiteBackend)


def query(store: ContextStore, sql: str, params: tuple = ()) -> list[tuple]:
    """Run SQL on a fresh connection of the store's database (SQLite file or PostgreSQL URL)."""
    if is_sqlite(store):
        conn = sqlite3.connect(store.backend.path)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(store.backend.url) as conn:
        return conn.execute(sql.replace("?", "%s"), params).fetchall()


def stored_chunk_ids(store: ContextStore) -> set[int]:
    table = "chunks" if is_sqlite(store) else "context_store.chunks"
    return {r[0] for r in query(store, f"SELECT id FROM {table}")}
