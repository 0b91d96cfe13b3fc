"""A thread-, process- and crash-safe store of text chunks: SQLite + HNSW on one machine, or PostgreSQL + pgvector
shared by many.

It never imports rocmforge's engine: pass any ``embed(texts) -> np.ndarray`` callable.

>>> from context_store import ContextStore  # doctest: +SKIP
"""
from context_store.records import AddResult, ContextStoreError, Document, Hit
from context_store.store import ContextStore

__all__ = ["AddResult", "ContextStore", "ContextStoreError", "Document", "Hit"]
