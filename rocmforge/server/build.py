"""What ``rocmforge serve`` builds from its options: the model, the embedder, the store, and ``create_app`` over them.

One function, so a plain server and each Ray Serve replica (``replicas.py``) run the very same app.

>>> app, close = build_app(ServeOptions(model="smollm2-135m", device="cpu"))  # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

from fastapi import FastAPI

from rocmforge.registry import DEFAULT_MODEL

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """``rocmforge serve``'s engine options (see its ``--help``)."""

    model: str = DEFAULT_MODEL
    context: str | None = None  # a SQLite file or a postgresql:// URL
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    n_ctx: int = 2048
    device: str = "auto"
    threads: int | None = None
    blas_threads: int = 1
    batch_invariant: bool = True
    embeddings: bool = True


def build_app(options: ServeOptions) -> tuple[FastAPI, Callable[[], None]]:
    """The app, and what to call once it has stopped (closes the context store)."""
    from rocmforge.model import load
    from rocmforge.server.app import LockedEmbedder, create_app
    from rocmforge.server.batch_invariant import use_batch_invariant_backend

    # One BLAS thread per forward by default: a multi-threaded sgemm waits for its slowest thread, so whenever
    # anything else (the event loop, another process) takes a core every call stalls. Measured on 2 shared cores:
    # a lone stream decoded at 0.5 tok/s with 2 OpenBLAS threads, 7.9 tok/s with 1. Parallelism then comes from
    # splitting the batch; on cores nothing else uses, --blas-threads 2 runs a 16-sequence step ~1.7x faster.
    model = load(options.model, device=options.device, n_ctx=options.n_ctx, n_parallel=options.max_batch,
                 n_threads=options.blas_threads)
    if options.batch_invariant and model.device in ("cpu", "cpu-exact") and not use_batch_invariant_backend(model):
        log.warning("%s on %s has no batch-invariant backend (K-quant weights switch kernels with the row count): a "
                    "request's text may differ alone and batched; device='cpu' has one", model.name, model.device)
    if model.device == "cpu" and os.environ.get("OPENBLAS_CORETYPE"):
        # measured here: 16 clients decode ~1.3x faster on OpenBLAS's own pick (SkylakeX) than on a forced Haswell
        log.warning("OPENBLAS_CORETYPE=%s forces that OpenBLAS kernel; unset it to let OpenBLAS pick this CPU's "
                    "own (faster batched decode; BENCHMARKS.md, \"Server on CPU\")", os.environ["OPENBLAS_CORETYPE"])
    embedder = store = None
    if options.embeddings or options.context is not None:
        from rocmforge.embedder import default_embedder

        embedder = LockedEmbedder(default_embedder())
    if options.context is not None:
        from context_store import ContextStore

        store = ContextStore(options.context, embed=embedder)
    workers = (options.threads or os.cpu_count() or 1) if model.device == "cpu" else 1
    app = create_app(model, max_batch=options.max_batch, max_queue=options.max_queue, api_key=options.api_key,
                     embedder=embedder, store=store, workers=workers)
    return app, (store.close if store is not None else lambda: None)
