"""Copy a SQLite store into PostgreSQL: documents, chunks and vectors as they are (nothing is re-embedded), with
their ids, so citations and document ids stay valid.

>>> n = migrate_to_postgres("ctx.db", "postgresql://me@dbhost/rocmforge")  # doctest: +SKIP
"""
from __future__ import annotations

import os
from pathlib import Path

from context_store.db import StoreDB
from context_store.records import ContextStoreError


def migrate_to_postgres(path: str | os.PathLike, url: str, *, M: int = 32, ef_construction: int = 200) -> int:
    """Copy every document of the SQLite store at ``path`` into the empty PostgreSQL store at ``url``.

    One transaction on the PostgreSQL side: it holds everything or nothing. Returns the number of documents."""
    from context_store.postgres import PostgresBackend
    from context_store.sqlite_backend import SQLiteBackend

    path = Path(path).expanduser()
    if not path.is_file():
        raise ContextStoreError(f"no SQLite store at {path}")
    probe = StoreDB(path)
    meta = probe.meta()
    probe.close()
    if "dim" not in meta:
        raise ContextStoreError(f"{path} has never been written (no embedder recorded): nothing to migrate")
    dim, embedder = int(meta["dim"]), meta["embedder"]
    source = SQLiteBackend(path, dim, M=M, ef_construction=ef_construction, ef=10)
    target = PostgresBackend(url, dim, M=M, ef_construction=ef_construction, ef=10)
    try:
        held = target.claim_embedder(dim, embedder)
        if held != (dim, embedder):
            raise ContextStoreError(f"{target.location} holds {held[0]}-dim vectors of {held[1]}; "
                                    f"{path} holds {dim}-dim vectors of {embedder}")
        return target.import_documents(source.export())
    finally:
        source.close()
        target.close()
