"""A thread-, process- and crash-safe store of text chunks: SQLite is the truth, HNSW the fast path.

It never imports rocmforge's engine: pass any ``embed(texts) -> np.ndarray`` callable.

>>> from context_store import ContextStore  # doctest: +SKIP
"""
from context_store.store import AddResult, ContextStore, ContextStoreError, Document, Hit

__all__ = ["AddResult", "ContextStore", "ContextStoreError", "Document", "Hit"]
