"""What the store hands out and takes in, shared by ``ContextStore`` and its two backends (SQLite, PostgreSQL)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from context_store.chunk import Chunk


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
    score: float  # the mode's own score: cosine (vector), keyword rank (keyword), fused score (hybrid, rrf)
    scores: dict[str, float] = field(default_factory=dict)  # every score this hit got
    metadata: dict[str, Any] = field(default_factory=dict)
    collection: str = "default"
    heading: str = ""  # the document's title and the section path where the chunk starts

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


@dataclass(frozen=True)
class NewDocument:
    """A chunked, embedded document on its way into a backend."""

    collection: str
    source: str
    content: str
    content_hash: str
    metadata: dict[str, Any]
    chunks: list[Chunk]
    embeddings: np.ndarray  # [len(chunks), dim] float32
    headings: list[str] = field(default_factory=list)  # one per chunk (title and section path), or none


@dataclass(frozen=True)
class StoredDocument:
    """A document with its chunks and their vectors as stored: what ``context migrate`` copies."""

    id: int
    collection: str
    source: str
    content: str
    content_hash: str
    metadata: dict[str, Any]
    created_at: float
    updated_at: float
    chunks: list[dict[str, Any]]  # id, ordinal, text, start, end, n_tokens, heading
    embeddings: np.ndarray
