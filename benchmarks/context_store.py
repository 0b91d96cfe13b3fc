"""Context store speed: ingest with MiniLM embeddings, and HNSW search latency + recall at 10k/100k vectors.

    .venv/bin/python -m benchmarks.context_store              # 10k and 100k (-m: the file name shadows the package)
    .venv/bin/python -m benchmarks.context_store --sizes 10000 --queries 100
    .venv/bin/python -m benchmarks.context_store --backends sqlite postgresql --copies 0   # both backends

``postgresql`` runs on a throwaway local server from the pgserver wheel (``context_store.local_postgres``):
pgvector's HNSW with the same M / ef_construction / ef, queried over a Unix socket. Its store is the SQLite one
moved over with ``context migrate`` (build s is the migration: one COPY, then one HNSW build).

Ingest: the bundled docs, each copy made unique, chunked at 128 MiniLM word pieces, embedded with
rocmforge's numpy all-MiniLM-L6-v2 and written through ``ContextStore.add_texts`` (SQLite + HNSW);
reported as chunks/s end to end and for the embedder alone.

Search: random unit vectors of dim 384, or with ``--vectors DIR`` real MiniLM vectors of text passages (the int8
rows + scales ``benchmarks/minilm_gpu.py --corpus`` writes; the last ``--queries`` rows are the queries), go in
through the store (an embed that looks vectors up by name, so no model time is counted). Latency is ``store.search(mode="vector")`` end to end (index +
SQLite rows; for PostgreSQL one SQL query and the rows) and, for SQLite, the bare ``knn_query``; recall@10 is against exact numpy brute force. The store's
defaults are used (M=32, ef_construction=200). Random vectors in 384 dims are the hard case for HNSW
(the true top-10 are barely closer than everything else), so recall here is a floor.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from context_store import ContextStore
from context_store.migrate import migrate_to_postgres
from rocmforge.cli.context import bundled_docs_dir
from rocmforge.embedder import MiniLMEmbedder


class LookupEmbed:
    """'v123' -> row 123 of a fixed matrix: vector search without embedding cost."""

    name = "lookup"

    def __init__(self, vectors: np.ndarray):
        self.vectors, self.dim = vectors, vectors.shape[1]

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.vectors[[int(t[1:]) for t in texts]]


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
        infos = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')}, {i.get('num_threads')} threads)"
                 for i in threadpool_info() if i.get("user_api") == "blas"]
        return "; ".join(infos) or "unknown"
    except ImportError:
        return "threadpoolctl not installed"


def bench_ingest(folder: Path, copies: int) -> dict[str, float]:
    embed = MiniLMEmbedder()
    docs = sorted(bundled_docs_dir().glob("*.md"))
    texts = [f"Copy {c}.\n" + p.read_text() for c in range(copies) for p in docs]
    with ContextStore(folder / "ingest.db", embed=embed, chunk_size=128, chunk_overlap=16) as store:
        start = time.perf_counter()
        results = store.add_texts(texts, sources=[f"doc{i}" for i in range(len(texts))])
        elapsed = time.perf_counter() - start
        chunk_texts = [c["text"] for r in results for c in store.chunks(r.document_id)]
    n_chunks = len(chunk_texts)
    start = time.perf_counter()
    embed(chunk_texts)
    embed_only = time.perf_counter() - start
    return {"documents": len(texts), "chunks": n_chunks, "seconds": elapsed, "chunks_per_s": n_chunks / elapsed,
            "embed_only_chunks_per_s": n_chunks / embed_only}


def real_vectors(folder: Path, n: int, n_queries: int) -> np.ndarray:
    """``n`` stored rows then ``n_queries`` query rows of the real vectors in ``folder`` (int8 times a row scale)."""
    rows = np.concatenate([np.load(p) for p in sorted(folder.glob("corpus_int8_*.npy"),
                                                       key=lambda p: int(p.stem.rsplit("_", 1)[1]))])
    vectors = rows.astype(np.float32) * np.load(folder / "corpus_scale.npy")
    if len(vectors) < n + n_queries:
        raise SystemExit(f"{folder} holds {len(vectors)} vectors, fewer than {n} + {n_queries} queries")
    vectors = np.concatenate([vectors[:n], vectors[-n_queries:]])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def bench_search(folder: Path, n: int, n_queries: int, efs: list[int], postgres_url: str | None = None,
                 k: int = 10, real: Path | None = None) -> list[dict[str, float]]:
    if real is not None:
        vectors = real_vectors(real, n, n_queries)
    else:
        rng = np.random.default_rng(n)
        vectors = rng.standard_normal((n + n_queries, 384)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    embed = LookupEmbed(vectors)
    rows = []
    path = folder / f"search{n}.db"
    if not path.exists() or postgres_url is None:
        with ContextStore(path, embed=embed) as store:
            start = time.perf_counter()
            for lo in range(0, n, 5000):
                hi = min(n, lo + 5000)
                store.add_texts([f"v{i}" for i in range(lo, hi)], sources=[f"s{i}" for i in range(lo, hi)])
            build = time.perf_counter() - start
    if postgres_url is not None:
        start = time.perf_counter()
        migrate_to_postgres(path, postgres_url)
        build = time.perf_counter() - start
    with ContextStore(postgres_url or path, embed=embed) as store:
        hnsw = getattr(store.backend, "index", None)  # SQLite's in-process index; PostgreSQL's is in the server
        base, queries = vectors[:n], vectors[n:]
        exact = np.argsort(-(queries @ base.T), axis=1)[:, :k] + 1  # chunk ids are row + 1
        for ef in efs:
            if hnsw is not None:
                hnsw.ef = ef
            else:
                store.backend.ef = ef
            end_to_end, bare, recalls = [], [], []
            for qi in range(n_queries):
                t0 = time.perf_counter()
                hits = store.search(f"v{n + qi}", k=k, mode="vector")
                t1 = time.perf_counter()
                if hnsw is not None:
                    hnsw.query(queries[qi], k)
                t2 = time.perf_counter()
                end_to_end.append(t1 - t0)
                bare.append(t2 - t1 if hnsw is not None else float("nan"))
                recalls.append(len({h.chunk_id for h in hits} & set(exact[qi].tolist())) / k)
            ms = lambda xs, q: 1000 * float(np.percentile(xs, q))  # noqa: E731
            rows.append({"n": n, "ef": ef, "build_s": build, "insert_per_s": n / build,
                         "p50_ms": ms(end_to_end, 50), "p99_ms": ms(end_to_end, 99),
                         "knn_p50_ms": ms(bare, 50), "knn_p99_ms": ms(bare, 99), "recall@10": float(np.mean(recalls))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000],
                        help="vector counts (none: skip the search part)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ef", type=int, nargs="+", default=[64, 128, 400])
    parser.add_argument("--copies", type=int, default=8, help="copies of the bundled docs to ingest (0: skip ingest)")
    parser.add_argument("--backends", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite"])
    parser.add_argument("--vectors", type=Path, default=None,
                        help="folder of real vectors (benchmarks/minilm_gpu.py --corpus) instead of random ones")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; BLAS: {blas_info()}; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.copies:
            ing = bench_ingest(Path(tmp), args.copies)
            print(f"ingest (MiniLM, 128-token chunks): {ing['documents']} docs, {ing['chunks']} chunks in "
                  f"{ing['seconds']:.1f} s = {ing['chunks_per_s']:.1f} chunks/s (embedder alone "
                  f"{ing['embed_only_chunks_per_s']:.1f} chunks/s)")
        print("| backend | vectors | ef | build s | inserts/s | search p50 ms | p99 ms | knn p50 ms | knn p99 ms | recall@10 |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        server = None
        if "postgresql" in args.backends:
            from context_store.local_postgres import LocalPostgres
            server = LocalPostgres()
        for n in args.sizes:
            for backend in args.backends:
                url = server.new_database() if backend == "postgresql" else None
                for r in bench_search(Path(tmp), n, args.queries, args.ef, url, real=args.vectors):
                    print(f"| {backend} | {r['n']:,} | {r['ef']} | {r['build_s']:.1f} | {r['insert_per_s']:.0f} | {r['p50_ms']:.2f} | "
                          f"{r['p99_ms']:.2f} | {r['knn_p50_ms']:.2f} | {r['knn_p99_ms']:.2f} | {r['recall@10']:.3f} |",
                          flush=True)
        if server is not None:
            server.stop()
    print(f"# load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
