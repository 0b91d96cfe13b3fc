"""The keyword side's definition, shared by both backends: SQLite's FTS5 tokenizer (``porter unicode61``), the
column weights (text 1, heading 2) and FTS5's BM25, so the PostgreSQL store ranks keywords exactly as SQLite does.

``FtsTerms`` runs SQLite's own tokenizer (an in-memory FTS5 table, read back through ``fts5vocab``) outside the
SQLite store: the PostgreSQL store keeps each chunk's weighted term frequencies and its token count from it.

>>> terms = FtsTerms()
>>> terms.count([("Sorting sorted lists", "Sort")])
[({'sort': 4.0, 'list': 1.0}, 4)]
>>> terms.tokens("sorting")
['sort']
>>> round(idf(n_rows=100, n_hits=10), 4)
2.154
"""
from __future__ import annotations

import math
import sqlite3
import threading

FTS_TOKENIZE = "porter unicode61"
FTS_WEIGHTS = {"text": 1.0, "heading": 2.0}  # a heading word says what the whole chunk is about
BM25_K1, BM25_B = 1.2, 0.75  # FTS5's constants (fts5_aux.c)


def idf(n_rows: int, n_hits: int) -> float:
    """FTS5's inverse document frequency: log((N - n + 0.5) / (n + 0.5)), at least 1e-6."""
    value = math.log((n_rows - n_hits + 0.5) / (n_hits + 0.5))
    return value if value > 0.0 else 1e-6


def bm25_sql(idf: str, frequency: str, length: str, average_length: str) -> str:
    """One query phrase's share of FTS5's BM25 as an SQL expression of four SQL expressions (``frequency``
    column-weighted; higher is better, where SQLite's ``bm25()`` returns its negative)."""
    k1, k1_plus_1, one_minus_b, b = (f"{v!r}::float8" for v in (BM25_K1, BM25_K1 + 1.0, 1.0 - BM25_B, BM25_B))
    return (f"({idf} * (({frequency} * {k1_plus_1}) / "  # fts5_aux.c's order of operations, for the same bits
            f"({frequency} + {k1} * ({one_minus_b} + {b} * {length} / {average_length}))))")


class FtsTerms:
    """SQLite FTS5's tokens of texts, from an in-memory FTS5 table with the store's tokenizer (thread-safe)."""

    def __init__(self) -> None:
        self._conn = sqlite3.connect(":memory:", check_same_thread=False)
        self._conn.execute(f"CREATE VIRTUAL TABLE t USING fts5(text, heading, tokenize='{FTS_TOKENIZE}')")
        self._conn.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
        self._lock = threading.Lock()

    def count(self, rows: list[tuple[str, str]]) -> list[tuple[dict[str, float], int]]:
        """Each ``(text, heading)``'s weighted term frequencies and token count (FTS5's column size)."""
        counts: list[tuple[dict[str, float], int]] = [({}, 0) for _ in rows]
        lengths = [0] * len(rows)
        with self._lock:
            self._conn.execute("DELETE FROM t")
            self._conn.executemany("INSERT INTO t (rowid, text, heading) VALUES (?, ?, ?)",
                                   [(i + 1, text, heading) for i, (text, heading) in enumerate(rows)])
            found = self._conn.execute("SELECT doc, col, term, count(*) FROM v GROUP BY doc, col, term").fetchall()
        for doc, column, term, n in found:
            frequencies = counts[doc - 1][0]
            frequencies[term] = frequencies.get(term, 0.0) + FTS_WEIGHTS[column] * n
            lengths[doc - 1] += n
        return [(frequencies, length) for (frequencies, _), length in zip(counts, lengths)]

    def tokens(self, word: str) -> list[str]:
        """The tokens FTS5 makes of ``word`` (a quoted query word: a phrase of them)."""
        with self._lock:
            self._conn.execute("DELETE FROM t")
            self._conn.execute("INSERT INTO t (rowid, text, heading) VALUES (1, ?, '')", (word,))
            return [t for (t,) in self._conn.execute("SELECT term FROM v ORDER BY \"offset\"")]
