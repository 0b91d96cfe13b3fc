"""``rocmforge serve``: the OpenAI-compatible server (continuous batching, embeddings, context store).

    rocmforge serve -m smollm2-135m --context notes.db --port 8080 --api-key secret --max-batch 16
"""
from __future__ import annotations

import logging
import os

import click

from rocmforge.registry import DEFAULT_MODEL

log = logging.getLogger(__name__)


@click.command()
@click.option("-m", "--model", "model_name", default=DEFAULT_MODEL, show_default=True,
              help="Registry name or path to a .gguf file.")
@click.option("--context", "context_db", default=None,
              help="Context store for /v1/context and \"context\" requests: a SQLite file (created if missing) or a "
                   "postgresql:// URL.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (loopback by default).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="ROCMFORGE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health (env: ROCMFORGE_API_KEY).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Sequences decoded together in one batched forward.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for a batch slot; beyond that the server answers 429.")
@click.option("--n-ctx", default=2048, show_default=True, type=click.IntRange(16),
              help="Context window per sequence (capped at the model's).")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cpu-exact (llama.cpp's CPU numbers bit for bit), cuda or hip.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="CPU: forwards run in parallel, each on one BLAS thread; a batch is split between them, at "
                   "least 16 tokens each [default: the number of cores].")
@click.option("--blas-threads", type=click.IntRange(1), default=1, show_default=True,
              help="CPU: BLAS threads inside each forward. More is faster on idle cores, but stalls whenever "
                   "another process takes one (see below).")
@click.option("--batch-invariant/--no-batch-invariant", default=True, show_default=True,
              help="CPU: bit-identical text for a request alone or batched (a lone stream decodes slower).")
@click.option("--no-embeddings", is_flag=True, help="Do not load the MiniLM embedder (no /v1/embeddings).")
def serve(model_name: str, context_db: str | None, host: str, port: int, api_key: str | None, max_batch: int,
          max_queue: int, n_ctx: int, device: str, threads: int | None, blas_threads: int,
          batch_invariant: bool, no_embeddings: bool) -> None:
    """Serve MODEL over HTTP with /v1/completions, /v1/chat/completions, /v1/embeddings and /v1/context."""
    import uvicorn

    from rocmforge.model import load
    from rocmforge.server.app import LockedEmbedder, create_app
    from rocmforge.server.batch_invariant import use_batch_invariant_backend

    # One BLAS thread per forward by default: a multi-threaded sgemm waits for its slowest thread, so whenever
    # anything else (the event loop, another process) takes a core every call stalls. Measured on 2 shared cores:
    # a lone stream decoded at 0.5 tok/s with 2 OpenBLAS threads, 7.9 tok/s with 1. Parallelism then comes from
    # splitting the batch; on cores nothing else uses, --blas-threads 2 runs a 16-sequence step ~1.7x faster.
    model = load(model_name, device=device, n_ctx=n_ctx, n_parallel=max_batch, n_threads=blas_threads)
    if batch_invariant and model.device in ("cpu", "cpu-exact") and not use_batch_invariant_backend(model):
        log.warning("%s on %s has no batch-invariant backend (K-quant weights switch kernels with the row count): a "
                    "request's text may differ alone and batched; device='cpu' has one", model.name, model.device)
    if model.device == "cpu" and os.environ.get("OPENBLAS_CORETYPE"):
        # measured here: 16 clients decode ~1.3x faster on OpenBLAS's own pick (SkylakeX) than on a forced Haswell
        log.warning("OPENBLAS_CORETYPE=%s forces that OpenBLAS kernel; unset it to let OpenBLAS pick this CPU's "
                    "own (faster batched decode; BENCHMARKS.md, \"Server on CPU\")", os.environ["OPENBLAS_CORETYPE"])
    embedder = store = None
    if not no_embeddings or context_db is not None:
        from rocmforge.embedder import default_embedder

        embedder = LockedEmbedder(default_embedder())
    if context_db is not None:
        from context_store import ContextStore

        store = ContextStore(context_db, embed=embedder)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach it can use it", host)
    app = create_app(model, max_batch=max_batch, max_queue=max_queue, api_key=api_key, embedder=embedder,
                     store=store, workers=(threads or os.cpu_count() or 1) if model.device == "cpu" else 1)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        if store is not None:
            store.close()
