"""Pieces of search that need no store: filters as SQL, FTS5 queries, exact cosine, rank fusion.

>>> reciprocal_rank_fusion([[1, 2, 3], [3, 1]], k=60)[:2]
[(1, 0.03252247488101534), (3, 0.032266458495966696)]
"""
from __future__ import annotations

import re
from typing import Any, Iterable

import numpy as np

RRF_K = 60  # Cormack et al. (2009): 1 / (60 + rank) — damps the head of each list

# Below this many candidate chunks a filtered vector search is exact (a matrix product beats HNSW).
EXACT_SEARCH_LIMIT = 4096


def where_clause(filters: dict[str, Any] | None) -> tuple[str, list]:
    """Filters -> SQL over ``chunks c`` / ``documents d`` / ``collections col``.

    ``collection``: name; ``source``: a glob (``*.md``); ``document_id``; any other key matches
    ``metadata[key]``. A list value means "any of these".
    """
    clauses, params = ["1 = 1"], []
    for key, value in (filters or {}).items():
        column, extra = {"collection": ("col.name", []), "source": ("d.source", []),
                         "document_id": ("d.id", [])}.get(key, ("json_extract(d.metadata, ?)", [_json_path(key)]))
        values = list(value) if isinstance(value, (list, tuple, set)) else [value]
        if key == "source":
            clauses.append("(" + " OR ".join("d.source GLOB ?" for _ in values) + ")")
            params.extend(str(v) for v in values)
        else:
            clauses.append(f"{column} IN ({','.join('?' * len(values))})")
            params.extend(extra + values)
    return " AND ".join(clauses), params


def _json_path(key: str) -> str:
    return '$."' + key.replace('"', "") + '"'


def fts_query(text: str) -> str | None:
    """Free text -> an FTS5 query: every word quoted (so no FTS syntax leaks in), any word may match."""
    words = re.findall(r"\w+", text.lower())
    return " OR ".join(f'"{w}"' for w in words) if words else None


def cosine_top_k(query: np.ndarray, ids: list[int], vectors: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Exact nearest neighbours by cosine similarity: the brute-force reference and the small-set path."""
    if not ids:
        return []
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    q = query / max(float(np.linalg.norm(query)), 1e-12)
    sims = unit @ q
    top = np.argsort(-sims, kind="stable")[:k]
    return [(ids[i], float(sims[i])) for i in top]


def reciprocal_rank_fusion(rankings: Iterable[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Fuse ranked id lists: score(id) = sum over lists of 1 / (k + rank), rank starting at 1."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
