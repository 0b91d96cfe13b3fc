"""Pieces of search that need no store: filters as SQL, FTS5 queries, exact cosine, fusion of the two lists.

Every store backend (SQLite here, PostgreSQL beside it) gathers the same candidates (the vector and the
keyword top lists, each candidate scored by both) and ranks them with ``fuse``, so their modes agree.

>>> reciprocal_rank_fusion([[1, 2, 3], [3, 1]], k=60)[:2]
[(1, 0.03252247488101534), (3, 0.032266458495966696)]
>>> [i for i, _ in score_fusion({1: 0.9, 2: 0.5, 3: 0.4}, {2: 7.0, 3: 1.0})]
[1, 2, 3]
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


# Words too common to say what a question is about (the usual English stopword list, trimmed of the words
# that are names in technical text: "not", "no", "all", "any", "each").
STOPWORDS = frozenset("""
a about above after again against am an and are as at be because been before being below between both but by
can could did do does doing down during few for from further had has have having he her here hers herself him
himself his how i if in into is it its itself just me more most my myself nor of off on once only or other our
ours ourselves out over own same she should so some such than that the their theirs them themselves then there
these they this those through to too under until up very was we were what when where which while who whom why
will with would you your yours yourself yourselves
""".split())


def keyword_words(text: str) -> list[str]:
    """The words of a keyword query: stopwords dropped (a query of stopwords only keeps them: better some match
    than none), each word once.

    >>> keyword_words("How do I sort a list? A list!")
    ['sort', 'list']
    """
    words = list(dict.fromkeys(re.findall(r"\w+", text.lower())))
    return [w for w in words if w not in STOPWORDS] or words


def fts_query(text: str) -> str | None:
    """Free text -> an FTS5 query: ``keyword_words`` quoted (so no FTS syntax leaks in), any word may match.

    FTS5 stems the quoted words with the table's porter tokenizer, so "sorting" matches "sorted".

    >>> fts_query("How do I sort a list?")
    '"sort" OR "list"'
    """
    words = keyword_words(text)
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


# Hybrid ranking, chosen on tests/fixtures/retrieval/pydoc (``rocmforge context eval``; held-out check on manpages):
# each candidate's cosine and keyword score as z-scores over the candidates (a candidate the keyword query did not
# match scores 0 before scaling), mixed 0.85 : 0.15. MRR@10 there: this 0.527, min-max scaling at 0.7 0.510, raw
# cosine + BM25/best 0.498, reciprocal-rank fusion 0.500, vector alone 0.474 (anchor labels); with the judged labels
# 0.624 (0.9: 0.599, 0.8: 0.604, 0.7: 0.599), rrf 0.610, vector 0.575. A dense hit far ahead of the rest
# keeps its lead even when BM25 never saw it, which rank fusion cannot do (rank 1 gets the same credit however
# clear the win).
VECTOR_WEIGHT = 0.85
POOL = 40  # candidates taken from each list


def _z_scores(scores: dict[int, float]) -> dict[int, float]:
    values = np.fromiter(scores.values(), dtype=np.float64, count=len(scores))
    spread = float(values.std()) or 1.0
    return {i: (s - float(values.mean())) / spread for i, s in scores.items()}


def score_fusion(cosines: dict[int, float], keyword: dict[int, float],
                 vector_weight: float = VECTOR_WEIGHT) -> list[tuple[int, float]]:
    """Rank candidates by ``w * z(cosine) + (1 - w) * z(keyword score)``, z-scores over the candidates (ties:
    smaller id first).

    ``cosines`` must score every candidate; ``keyword`` (higher-is-better) only those the keyword query matched,
    the others count 0."""
    if not cosines:
        return []
    dense = _z_scores(cosines)
    lexical = _z_scores({i: max(keyword.get(i, 0.0), 0.0) for i in cosines})
    scores = {i: vector_weight * dense[i] + (1 - vector_weight) * lexical[i] for i in cosines}
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
