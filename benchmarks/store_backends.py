"""The context store's two backends side by side on the labelled retrieval sets: MRR@10 (and the other metrics of
``context_store.evaluate``) per search mode, SQLite + HNSW vs PostgreSQL + pgvector (a throwaway local server
from the pgserver wheel). Both stores get the very same vectors (each text is embedded once), so a difference
comes from the vector index (hnswlib vs pgvector; the keyword side is the same BM25 on both), not from the embedder.

    .venv/bin/python -m benchmarks.store_backends [--embedder minilm|hashed] [--sets pydoc manpages]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from context_store import ContextStore
from context_store.evaluate import Evaluation, RetrievalSet
from context_store.local_postgres import LocalPostgres

SETS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "retrieval"
MODES = ("vector", "keyword", "hybrid", "rrf")


class EmbedOnce:
    """An embedder that remembers every text's vector, so two stores get identical vectors for one cost."""

    def __init__(self, inner):
        self.inner, self.name, self.dim = inner, inner.name, inner.dim
        self.cache: dict[str, np.ndarray] = {}
        if hasattr(inner, "token_spans"):
            self.token_spans = inner.token_spans

    def __call__(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            self.cache.update(zip(missing, np.asarray(self.inner(missing), dtype=np.float32)))
        return np.stack([self.cache[t] for t in texts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedder", choices=["minilm", "hashed"], default="minilm")
    parser.add_argument("--sets", nargs="+", default=["pydoc", "manpages"])
    args = parser.parse_args()
    from rocmforge.embedder import HashedNgramEmbedder, MiniLMEmbedder

    embed = EmbedOnce(MiniLMEmbedder() if args.embedder == "minilm" else HashedNgramEmbedder())
    modes = [m for m in MODES]
    print(f"| set | mode | SQLite MRR@10 | PostgreSQL MRR@10 | difference | SQLite R@10 | PostgreSQL R@10 |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp, LocalPostgres() as server:
        for name in args.sets:
            dataset = RetrievalSet.load(SETS / name)
            results = {}
            for backend, location in (("sqlite", Path(tmp) / f"{name}.db"), ("postgresql", server.new_database())):
                with ContextStore(location, embed=embed) as store:
                    evaluation = Evaluation(store, dataset)
                    results[backend] = {mode: evaluation.run(mode) for mode in modes}
            for mode in modes:
                a, b = results["sqlite"][mode], results["postgresql"][mode]
                print(f"| {name} | {mode} | {a['MRR@10']:.3f} | {b['MRR@10']:.3f} | {b['MRR@10'] - a['MRR@10']:+.3f} "
                      f"| {a['R@10']:.3f} | {b['R@10']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
