"""ContextStore: documents, their chunks and vectors, searched by vector, keyword or both.

Two backends behind one API: a file path keeps the store in SQLite with an HNSW index beside it
(``sqlite_backend.py``; one machine, any number of threads and processes); a ``postgresql://`` URL keeps it
in PostgreSQL with pgvector's HNSW and the same BM25 (``postgres.py``; many machines share one store).
Chunking, headings, embedding, dedupe, fusion (``search.py``) and hit shapes are the same for both, here.

Every document is one transaction committed before ``add_text`` returns, so an acknowledged write survives
``kill -9`` and an interrupted one leaves nothing behind.

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
import logging
import os
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from context_store.chunk import TokenSpans, chunk_headings, chunk_text, document_title
from context_store.records import AddResult, ContextStoreError, Document, Hit, NewDocument
from context_store.search import POOL, cosine_top_k, reciprocal_rank_fusion, score_fusion

log = logging.getLogger(__name__)

Embed = Callable[[list[str]], np.ndarray]
Mode = Literal["hybrid", "rrf", "vector", "keyword"]
MODES = ("hybrid", "rrf", "vector", "keyword")
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(location: str | os.PathLike) -> bool:
    """True for a ``postgresql://`` (or ``postgres://``) URL: the store lives in PostgreSQL."""
    return str(location).startswith(POSTGRES_SCHEMES)


class ContextStore:
    """A persistent, searchable store of text chunks. ``embed`` maps texts to vectors [n, dim].

    ``location``: a file path (SQLite + HNSW) or a ``postgresql://`` URL (PostgreSQL + pgvector; the database
    needs the ``vector`` extension, created here when the user may). ``reembed=True`` re-embeds every stored
    chunk with ``embed`` on open (the way to switch embedders); otherwise opening a store built by another
    embedder raises ``ContextStoreError``. ``ef``, ``M``, ``ef_construction``: HNSW search breadth and shape.
    """

    def __init__(self, location: str | os.PathLike, embed: Embed, dim: int | None = None, *,
                 chunk_size: int = 200, chunk_overlap: int = 40, token_spans: TokenSpans | None = None,
                 ef: int = 128, M: int = 32, ef_construction: int = 200, reembed: bool = False):
        self.embed = embed
        self.embedder_name = getattr(embed, "name", None) or getattr(embed, "__name__", "custom")
        self.dim = dim or getattr(embed, "dim", None) or int(np.asarray(embed(["dimension probe"])).shape[1])
        self.chunk_size, self.chunk_overlap = chunk_size, chunk_overlap
        self.token_spans = token_spans or getattr(embed, "token_spans", None)
        if is_postgres_url(location):
            from context_store.postgres import PostgresBackend

            self.backend = PostgresBackend(str(location), self.dim, M=M, ef_construction=ef_construction, ef=ef)
        else:
            from context_store.sqlite_backend import SQLiteBackend

            self.backend = SQLiteBackend(location, self.dim, M=M, ef_construction=ef_construction, ef=ef)
        self.location = self.backend.location
        try:
            self._check_embedder(reembed)
            if reembed:
                self.reindex(reembed=True)
            else:
                self.backend.open()
        except BaseException:
            self.backend.close()
            raise

    def _check_embedder(self, reembed: bool) -> None:
        dim, name = self.backend.claim_embedder(self.dim, self.embedder_name)
        if reembed:
            return
        if dim != self.dim:
            raise ContextStoreError(f"{self.location} holds {dim}-dim vectors ({name}); "
                                    f"this embedder gives {self.dim} (reindex with --reembed to switch)")
        if name != self.embedder_name:
            raise ContextStoreError(f"{self.location} was embedded with {name}, not "
                                    f"{self.embedder_name} (reindex with --reembed to switch)")

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
        stored = self.backend.find_documents(collection, hashes)
        pending: dict[str, int] = {}  # content hash -> position of the first new text with it
        for i, content_hash in enumerate(hashes):
            if content_hash not in pending and content_hash not in stored:
                pending[content_hash] = i
        chunked = {i: chunk_text(texts[i], self.chunk_size, self.chunk_overlap, self.token_spans)
                   for i in pending.values()}
        for i, chunks in chunked.items():
            if not chunks:
                raise ContextStoreError(f"{sources[i]}: nothing to index (empty or whitespace only)")
        headings = {i: chunk_headings(texts[i], chunks, document_title(sources[i], metadatas[i]))
                    for i, chunks in chunked.items()}
        # the embedder sees the chunk's text alone: with its heading line in front, MiniLM ranked worse on the
        # tuning set (vector MRR@10 0.436 vs 0.474; the heading goes to the keyword index instead)
        flat = [c.text for i in chunked for c in chunked[i]]
        vectors = self._embed(flat) if flat else np.zeros((0, self.dim), np.float32)  # slow: before any lock
        docs, offset = [], 0
        for i, chunks in chunked.items():
            docs.append(NewDocument(collection, sources[i], texts[i], hashes[i], metadatas[i], chunks,
                                    vectors[offset:offset + len(chunks)], headings[i]))
            offset += len(chunks)
        inserted = self.backend.insert_documents(docs)  # None: another writer added it while we embedded
        results = {i: AddResult(doc_id, len(chunked[i]), skipped=False)
                   for i, doc_id in zip(chunked, inserted) if doc_id is not None}
        skipped = [i for i in range(len(texts)) if i not in results]  # duplicates, of stored or of earlier texts
        stored = self.backend.find_documents(collection, [hashes[i] for i in skipped]) if skipped else {}
        for i in skipped:
            results[i] = AddResult(stored.get(hashes[i]), 0, skipped=True)
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
        return self.backend.delete_document(document_id)

    # -- reading -----------------------------------------------------------------------------------
    def search(self, query: str, k: int = 5, mode: Mode = "hybrid",
               filters: dict[str, Any] | None = None) -> list[Hit]:
        """The k best chunks for ``query``. Filters: collection, source (glob), document_id, metadata keys.

        Modes: ``hybrid`` (the candidates of both lists, each scored by cosine and by keyword rank, ranked by
        ``search.score_fusion``), ``rrf`` (reciprocal-rank fusion of the two lists), ``vector``, ``keyword``.
        """
        if mode not in MODES:
            raise ContextStoreError(f"unknown search mode {mode!r}; use {', '.join(MODES)}")
        if k < 1:
            return []
        pool = k if mode in ("vector", "keyword") else max(k, POOL)
        query_vector = self._embed([query])[0] if mode != "keyword" else None
        vector = self.backend.nearest(query_vector, pool, filters) if mode != "keyword" else []
        keyword = self.backend.keyword(query, pool, filters) if mode != "vector" else []
        cosines, keyword_scores = dict(vector), dict(keyword)
        if mode == "vector":
            ranked = vector
        elif mode == "keyword":
            ranked = keyword
        elif mode == "rrf":
            ranked = reciprocal_rank_fusion([[i for i, _ in vector], [i for i, _ in keyword]])
        else:
            self._complete_scores(query, query_vector, cosines, keyword_scores)
            ranked = score_fusion(cosines, keyword_scores)
        rows = self.backend.hits([i for i, _ in ranked])
        hits = []
        for chunk_id, score in ranked:
            row = rows.get(chunk_id)
            if row is None:  # deleted after the index answered
                continue
            scores = {"vector": cosines.get(chunk_id), "keyword": keyword_scores.get(chunk_id)}
            if mode in ("hybrid", "rrf"):
                scores[mode] = score
            hits.append(Hit(chunk_id, row["document_id"], row["source"], row["text"], row["start"], row["end"],
                            float(score), {n: s for n, s in scores.items() if s is not None},
                            row["metadata"], row["collection"], row["heading"]))
        return hits[:k]

    def _complete_scores(self, query: str, query_vector: np.ndarray, cosines: dict[int, float],
                         keyword_scores: dict[int, float]) -> None:
        """Give every candidate both scores: the cosine of keyword-only ones (from their stored vectors), the
        keyword rank of vector-only ones (absent when none of the query's words is in them)."""
        keyword_only = [i for i in keyword_scores if i not in cosines]
        if keyword_only:
            ids, vectors = self.backend.embeddings(keyword_only)
            cosines.update(cosine_top_k(query_vector, ids, vectors, len(ids)))
        vector_only = [i for i in cosines if i not in keyword_scores]
        if vector_only:
            keyword_scores.update(self.backend.keyword(query, len(vector_only), None, among=vector_only))

    def get(self, document_id: int, with_content: bool = True) -> Document | None:
        """One document (with its full text unless ``with_content=False``), or None."""
        docs = self.backend.documents(document_id=document_id, with_content=with_content)
        return docs[0] if docs else None

    def list(self, collection: str | None = None, limit: int | None = None) -> list[Document]:
        """Documents, oldest first (without their text)."""
        return self.backend.documents(collection=collection, limit=limit)

    def chunks(self, document_id: int) -> list[dict[str, Any]]:
        """A document's chunks in order: id, ordinal, text, start, end, n_tokens, heading."""
        return self.backend.chunks(document_id)

    def stats(self) -> dict[str, Any]:
        """Counts and sizes (the keys beyond documents/chunks/collections/dim/embedder depend on the backend)."""
        return {**self.backend.stats(), "dim": self.dim}

    # -- maintenance -------------------------------------------------------------------------------
    def reindex(self, reembed: bool = False) -> int:
        """Rebuild the vector index; with ``reembed``, first re-embed every chunk with this embedder.

        Returns the number of vectors indexed."""
        if reembed:
            self.backend.reembed(self._embed, self.dim, self.embedder_name)
            return self.backend.count_chunks()
        return self.backend.reindex()

    def vacuum(self) -> dict[str, int]:
        """Compact: drop deleted vectors from the index, reclaim space. Returns sizes in bytes."""
        return self.backend.vacuum()

    def save(self) -> None:
        """Persist what is only in memory now (SQLite's HNSW index; PostgreSQL keeps nothing there)."""
        self.backend.save()

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "ContextStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.backend.count_chunks()
