"""Retrieval quality on a labelled set in BEIR's format: MRR@10, nDCG@10 and recall (hit rate) at 1, 5, 10.

A set is a folder with ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``) and
``qrels/test.tsv`` (``query-id``, ``corpus-id``, ``score``; score > 0 is relevant). Each passage becomes one
document of the store (its title in ``metadata["title"]``), each query is searched in every mode, hits are
turned into passages (several chunks of one passage count once, at the best rank), and the metrics are
averaged over the queries. ``R@k`` is the share of queries with a relevant passage among the first k.

>>> ranked, relevant = ["a", "b", "c"], {"b"}
>>> {name: round(value, 3) for name, value in query_metrics(ranked, relevant).items()}
{'MRR@10': 0.5, 'nDCG@10': 0.631, 'R@1': 0.0, 'R@5': 1.0, 'R@10': 1.0}
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np

CUTOFF = 10
RECALL_AT = (1, 5, 10)


class Searchable(Protocol):
    """What evaluation needs from a store (``ContextStore`` and any other backend of its API)."""

    def add_texts(self, texts: list[str], sources: list[str] | None = None,
                  metadatas: list[dict[str, Any]] | None = None, collection: str = "default") -> list[Any]: ...
    def search(self, query: str, k: int = 5, mode: str = "hybrid",
               filters: dict[str, Any] | None = None) -> list[Any]: ...


@dataclass(frozen=True)
class RetrievalSet:
    name: str
    corpus: dict[str, dict[str, str]]  # passage id -> {"title", "text"}
    queries: dict[str, str]            # query id -> text
    qrels: dict[str, set[str]]         # query id -> relevant passage ids

    @classmethod
    def load(cls, folder: str | Path, split: str = "test") -> "RetrievalSet":
        """Read a BEIR folder; a missing file or a query without relevant passages raises ``ValueError``."""
        folder = Path(folder)
        paths = [folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"{folder} is not a BEIR set: missing {', '.join(missing)}")
        corpus = {row["_id"]: {"title": row.get("title", ""), "text": row["text"]} for row in _jsonl(paths[0])}
        queries = {row["_id"]: row["text"] for row in _jsonl(paths[1])}
        qrels: dict[str, set[str]] = {}
        with open(paths[2], newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                if float(row["score"]) > 0 and row["corpus-id"] in corpus:
                    qrels.setdefault(row["query-id"], set()).add(row["corpus-id"])
        queries = {qid: text for qid, text in queries.items() if qid in qrels}
        if not queries:
            raise ValueError(f"{folder}: no query has a relevant passage in the corpus")
        return cls(folder.name, corpus, queries, qrels)


def _jsonl(path: Path) -> Iterable[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def query_metrics(ranked: list[str], relevant: set[str], n_relevant: int | None = None) -> dict[str, float]:
    """Metrics of one query from its ranked passage ids (best first) and its relevant ids.

    ``n_relevant`` is how many relevant results an ideal ranking could show (nDCG's ideal), by default
    ``len(relevant)``."""
    ranked = ranked[:CUTOFF]
    gains = [1.0 if pid in relevant else 0.0 for pid in ranked]
    first = next((i for i, g in enumerate(gains) if g), None)
    ideal = min(n_relevant if n_relevant is not None else len(relevant), CUTOFF)
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
    idcg = sum(1.0 / math.log2(i + 2) for i in range(ideal))
    out = {"MRR@10": 1.0 / (first + 1) if first is not None else 0.0, "nDCG@10": dcg / idcg if idcg else 0.0}
    out.update({f"R@{k}": float(first is not None and first < k) for k in RECALL_AT})
    return out


class Evaluation:
    """A retrieval set loaded into a store: ``run(mode)`` searches every query and averages the metrics.

    Passages with identical text are one document in the store (it skips duplicates); a hit on that
    document stands for all of them.
    """

    def __init__(self, store: Searchable, dataset: RetrievalSet, collection: str = "eval",
                 batch: int = 64, progress: Callable[[Iterable], Iterable] | None = None):
        self.store, self.dataset, self.collection = store, dataset, collection
        ids = list(dataset.corpus)
        self.passages_of: dict[int, list[str]] = {}
        starts = range(0, len(ids), batch)
        for start in (progress(starts) if progress else starts):
            part = ids[start:start + batch]
            results = store.add_texts([dataset.corpus[i]["text"] for i in part], sources=part,
                                      metadatas=[{"title": dataset.corpus[i]["title"]} for i in part],
                                      collection=collection)
            for pid, result in zip(part, results):
                self.passages_of.setdefault(result.document_id, []).append(pid)

    def ranked_passages(self, query: str, mode: str, pool: int = 40) -> list[list[str]]:
        """Documents in rank order (each as its passage ids), one entry per document, at most CUTOFF."""
        seen: dict[int, None] = {}
        for hit in self.store.search(query, k=pool, mode=mode, filters={"collection": self.collection}):
            seen.setdefault(hit.document_id, None)
        return [self.passages_of.get(doc, []) for doc in list(seen)[:CUTOFF]]

    def query_result(self, qid: str, mode: str) -> dict[str, float]:
        relevant = self.dataset.qrels[qid]
        docs = self.ranked_passages(self.dataset.queries[qid], mode)
        # a document is relevant when any of its passages is; the ideal ranking shows each relevant document once
        flags = ["hit" if relevant.intersection(passages) else f"miss{n}" for n, passages in enumerate(docs)]
        relevant_docs = {doc for doc, passages in self.passages_of.items() if relevant.intersection(passages)}
        return query_metrics(flags, {"hit"}, n_relevant=len(relevant_docs))

    def run(self, mode: str) -> dict[str, float]:
        """Mean metrics of ``mode`` over every query."""
        rows = [self.query_result(qid, mode) for qid in self.dataset.queries]
        return {name: float(np.mean([r[name] for r in rows])) for name in rows[0]}


def format_table(results: dict[str, dict[str, float]], title: str = "") -> str:
    """Results per mode as a fixed-width table (modes as rows)."""
    names = list(next(iter(results.values())))
    lines = [title] if title else []
    lines.append(f"{'mode':<10}" + "".join(f"{n:>9}" for n in names))
    lines += [f"{mode:<10}" + "".join(f"{m[n]:>9.3f}" for n in names) for mode, m in results.items()]
    return "\n".join(lines)
