"""``rocmforge serve``: the OpenAI-compatible server (continuous batching, embeddings, context store).

    rocmforge serve -m smollm2-135m --context notes.db --port 8080 --api-key secret --max-batch 16
    rocmforge serve -m smollm2-135m --replicas 4 --ray-address auto   # 4 engines on a Ray cluster, one endpoint
"""
from __future__ import annotations

import logging

import click

from rocmforge.cli.types import DEVICE, HOST, non_empty
from rocmforge.registry import DEFAULT_MODEL
from rocmforge.server.build import ServeOptions, build_app

log = logging.getLogger(__name__)


@click.command()
@click.option("-m", "--model", "model_name", default=DEFAULT_MODEL, show_default=True,
              help="Registry name or path to a .gguf file.")
@click.option("--context", "context_db", default=None,
              help="Context store for /v1/context and \"context\" requests: a SQLite file (created if missing) or a "
                   "postgresql:// URL.")
@click.option("--host", default="127.0.0.1", show_default=True, type=HOST,
              help="Interface to listen on (loopback by default).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="ROCMFORGE_API_KEY", default=None, callback=non_empty,
              help="Require 'Authorization: Bearer KEY' on every route but /health (env: ROCMFORGE_API_KEY).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Sequences decoded together in one batched forward.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0),
              help="Requests that may wait for a batch slot; beyond that the server answers 429.")
@click.option("--n-ctx", default=2048, show_default=True, type=click.IntRange(16),
              help="Context window per sequence (capped at the model's).")
@click.option("--device", default="auto", show_default=True, type=DEVICE,
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
@click.option("--replicas", type=click.IntRange(1), default=None,
              help="Run N engines on Ray Serve behind this one endpoint: one per GPU, or per CPU worker when the "
                   "cluster has no GPU (needs the distributed extra; see docs/distributed.md).")
@click.option("--ray-address", default=None,
              help="With --replicas: the Ray cluster to join (e.g. auto) [default: start a local one].")
def serve(model_name: str, context_db: str | None, host: str, port: int, api_key: str | None, max_batch: int,
          max_queue: int, n_ctx: int, device: str, threads: int | None, blas_threads: int,
          batch_invariant: bool, no_embeddings: bool, replicas: int | None, ray_address: str | None) -> None:
    """Serve MODEL over HTTP with /v1/completions, /v1/chat/completions, /v1/embeddings and /v1/context."""
    if ray_address is not None and replicas is None:
        raise click.BadOptionUsage("ray_address", "--ray-address needs --replicas N")
    options = ServeOptions(model=model_name, context=context_db, api_key=api_key, max_batch=max_batch,
                           max_queue=max_queue, n_ctx=n_ctx, device=device, threads=threads,
                           blas_threads=blas_threads, batch_invariant=batch_invariant, embeddings=not no_embeddings)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach it can use it", host)
    if replicas is not None:
        from rocmforge.server.replicas import serve_replicas

        serve_replicas(options, replicas, host=host, port=port, ray_address=ray_address)
        return
    import uvicorn

    app, close = build_app(options)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        close()
