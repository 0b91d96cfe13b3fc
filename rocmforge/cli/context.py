"""``rocmforge context ...``: add, search, list, show, rm, stats, reindex, vacuum, migrate on a context store.

    rocmforge context add docs/ notes.txt -c "a quick note"   # files, folders (by glob), text, or - for stdin
    rocmforge context search "how are deletes compacted" -k 3 --mode hybrid --json
    rocmforge context --db postgresql://me@dbhost/rocmforge search "..."   # a store shared by many machines
    rocmforge context --db ctx.db migrate --to postgresql://me@dbhost/rocmforge
"""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click
from tqdm import tqdm

from context_store import ContextStore, ContextStoreError
from rocmforge import registry

DEFAULT_GLOBS = ("*.md", "*.txt", "*.rst")


def bundled_docs_dir() -> Path:
    """A few short markdown notes about rocmforge itself, shipped for demos (``add --bundled-docs``)."""
    return Path(__file__).resolve().parents[1] / "data" / "docs"


def default_db() -> Path:
    return registry.home() / "context.db"


def _make_embedder(kind: str):
    from rocmforge.embedder import HashedNgramEmbedder, MiniLMEmbedder, default_embedder

    if kind == "hashed":
        return HashedNgramEmbedder()
    if kind == "minilm":
        return MiniLMEmbedder()
    return default_embedder(progress=sys.stderr.isatty())


@contextmanager
def _store(ctx: click.Context, **options) -> Iterator[ContextStore]:
    """Open the store named by --db; store errors become one-line click errors (exit 1)."""
    try:
        store = ContextStore(ctx.obj["db"], embed=_make_embedder(ctx.obj["embedder"]), **options)
    except ContextStoreError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        yield store
    except ContextStoreError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        store.close()


@click.group("context")
@click.option("--db", default=None,
              help="Store: a SQLite file, or a postgresql:// URL (PostgreSQL + pgvector) "
                   "[default: $ROCMFORGE_HOME/context.db].")
@click.option("--embedder", type=click.Choice(["auto", "minilm", "hashed"]), default="auto", show_default=True,
              envvar="ROCMFORGE_EMBEDDER",
              help="auto: all-MiniLM-L6-v2, or the lexical hashed n-gram fallback when it cannot be fetched.")
@click.pass_context
def context(ctx: click.Context, db: str | None, embedder: str) -> None:
    """A searchable store of documents (SQLite + HNSW, or PostgreSQL + pgvector) for retrieval into prompts."""
    ctx.ensure_object(dict)
    ctx.obj.update(db=db or default_db(), embedder=embedder)


def _expand(paths: tuple[str, ...], globs: tuple[str, ...]) -> list[Path]:
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files.extend(sorted({p for g in globs for p in path.rglob(g) if p.is_file()}))
        elif path.is_file():
            files.append(path)
        else:
            raise click.ClickException(f"no such file or folder: {name}")
    return files


def _parse_meta(pairs: tuple[str, ...]) -> dict[str, str]:
    meta = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.ClickException(f"metadata must look like key=value, got {pair!r}")
        meta[key] = value
    return meta


@context.command()
@click.argument("paths", nargs=-1)
@click.option("-c", "--text", "texts", multiple=True, help="Add this text as a document (repeatable).")
@click.option("--glob", "globs", multiple=True, default=DEFAULT_GLOBS, show_default=True,
              help="File patterns to take from folders (repeatable).")
@click.option("--chunk-size", type=click.IntRange(min=1), default=200, show_default=True, help="Tokens per chunk.")
@click.option("--overlap", type=click.IntRange(min=0), default=40, show_default=True, help="Tokens shared by neighbours.")
@click.option("--collection", default="default", show_default=True)
@click.option("-m", "--meta", "meta", multiple=True, help="key=value metadata for every added document.")
@click.option("--bundled-docs", is_flag=True, help="Also add the short notes about rocmforge that ship with it.")
@click.pass_context
def add(ctx: click.Context, paths: tuple[str, ...], texts: tuple[str, ...], globs: tuple[str, ...],
        chunk_size: int, overlap: int, collection: str, meta: tuple[str, ...], bundled_docs: bool) -> None:
    """Add files, folders (recursively, by --glob), -c TEXT, or - (stdin)."""
    if bundled_docs:
        paths = (*paths, str(bundled_docs_dir()))
    if overlap >= chunk_size:
        raise click.ClickException(f"--overlap ({overlap}) must be smaller than --chunk-size ({chunk_size})")
    metadata = _parse_meta(meta)
    items: list[tuple[str, str | Path]] = [("text", t) for t in texts]
    if "-" in paths:
        with click.open_file("-") as stdin:
            items.append(("stdin", stdin.read()))
    items += [("file", p) for p in _expand(tuple(p for p in paths if p != "-"), globs)]
    if not items:
        raise click.ClickException("nothing to add: give files, folders, -c TEXT or -")
    added = skipped = chunks = 0
    with _store(ctx, chunk_size=chunk_size, chunk_overlap=overlap) as store:
        for kind, item in tqdm(items, desc="adding", unit="doc", disable=len(items) < 2, file=sys.stderr):
            if kind == "file":
                result = store.add_document(item, metadata=metadata, collection=collection)
            else:
                result = store.add_text(item, source=f"<{kind}>", metadata=metadata, collection=collection)
            skipped += result.skipped
            added += not result.skipped
            chunks += result.n_chunks
    click.echo(f"added {added} document(s), {chunks} chunk(s); skipped {skipped} already stored")


@context.command()
@click.argument("query")
@click.option("-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--mode", type=click.Choice(["hybrid", "vector", "keyword"]), default="hybrid", show_default=True)
@click.option("--collection", default=None, help="Only this collection.")
@click.option("--source", default=None, help="Only sources matching this glob.")
@click.option("-w", "--where", "where", multiple=True, help="key=value metadata filter (repeatable).")
@click.option("--ef", type=click.IntRange(min=1), default=128, show_default=True, help="HNSW search breadth.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per hit per line (NDJSON).")
@click.pass_context
def search(ctx: click.Context, query: str, k: int, mode: str, collection: str | None, source: str | None,
           where: tuple[str, ...], ef: int, as_json: bool) -> None:
    """Search the store: vector (HNSW), keyword (BM25 / ts_rank) or hybrid (reciprocal-rank fusion)."""
    filters: dict[str, str] = _parse_meta(where)
    if collection:
        filters["collection"] = collection
    if source:
        filters["source"] = source
    with _store(ctx, ef=ef) as store:
        hits = store.search(query, k=k, mode=mode, filters=filters or None)
    for rank, hit in enumerate(hits, start=1):
        if as_json:
            click.echo(json.dumps({"rank": rank, **hit.to_dict()}, ensure_ascii=False))
        else:
            preview = " ".join(hit.text.split())
            click.echo(f"{rank}. {hit.score:.4f}  {hit.source} [{hit.start}:{hit.end}] (doc {hit.document_id})")
            click.echo(f"   {preview[:200]}{'…' if len(preview) > 200 else ''}")


@context.command("list")
@click.option("--collection", default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_documents(ctx: click.Context, collection: str | None, as_json: bool) -> None:
    """List stored documents."""
    with _store(ctx) as store:
        docs = store.list(collection=collection)
    for doc in docs:
        if as_json:
            click.echo(json.dumps({k: v for k, v in doc.__dict__.items() if k != "content"}, ensure_ascii=False))
        else:
            click.echo(f"{doc.id:>6}  {doc.n_chunks:>4} chunks  {doc.collection:<12} {doc.source}")


@context.command()
@click.argument("document_id", type=int)
@click.option("--chunks", "show_chunks", is_flag=True, help="Print the chunks instead of the full text.")
@click.pass_context
def show(ctx: click.Context, document_id: int, show_chunks: bool) -> None:
    """Show one document: source, metadata and text."""
    with _store(ctx) as store:
        doc = store.get(document_id)
        if doc is None:
            raise click.ClickException(f"no document with id {document_id}")
        chunks = store.chunks(document_id) if show_chunks else []
    click.echo(f"id {doc.id}  source {doc.source}  collection {doc.collection}  chunks {doc.n_chunks}")
    click.echo(f"metadata {json.dumps(doc.metadata, ensure_ascii=False)}  sha256 {doc.content_hash}")
    if show_chunks:
        for chunk in chunks:
            click.echo(f"--- chunk {chunk['ordinal']} [{chunk['start']}:{chunk['end']}] {chunk['n_tokens']} tokens")
            click.echo(chunk["text"])
    else:
        click.echo(doc.content)


@context.command()
@click.argument("document_ids", type=int, nargs=-1, required=True)
@click.pass_context
def rm(ctx: click.Context, document_ids: tuple[int, ...]) -> None:
    """Delete documents (their chunks leave SQLite and the index at once; `vacuum` reclaims space)."""
    with _store(ctx) as store:
        missing = [i for i in document_ids if not store.delete(i)]
    if missing:
        raise click.ClickException(f"no document with id {', '.join(map(str, missing))}")
    click.echo(f"deleted {len(document_ids)} document(s)")


@context.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Counts and sizes."""
    with _store(ctx) as store:
        numbers = store.stats()
    if as_json:
        click.echo(json.dumps(numbers))
    else:
        for key, value in numbers.items():
            click.echo(f"{key:<22}{value}")


@context.command()
@click.option("--reembed", is_flag=True, help="Re-embed every chunk with the current embedder first.")
@click.pass_context
def reindex(ctx: click.Context, reembed: bool) -> None:
    """Rebuild the HNSW index from the stored vectors."""
    with _store(ctx, reembed=reembed) as store:
        # opening with reembed=True has already re-embedded and rebuilt
        count = len(store) if reembed else store.reindex()
    click.echo(f"index rebuilt: {count} vectors")


@context.command()
@click.pass_context
def vacuum(ctx: click.Context) -> None:
    """Compact: drop deleted vectors from the index and reclaim space."""
    with _store(ctx) as store:
        sizes = store.vacuum()
    click.echo(f"{sizes['bytes_before']} -> {sizes['bytes_after']} bytes")


@context.command()
@click.option("--to", "url", required=True, help="The PostgreSQL store: postgresql://USER@HOST/DATABASE.")
@click.pass_context
def migrate(ctx: click.Context, url: str) -> None:
    """Copy the --db SQLite store into an empty PostgreSQL store (ids and vectors as they are; no re-embedding)."""
    from context_store.migrate import migrate_to_postgres
    from context_store.postgres import redact
    from context_store.store import is_postgres_url

    if is_postgres_url(ctx.obj["db"]) or not is_postgres_url(url):
        raise click.ClickException("migrate copies a SQLite --db into a postgresql:// store given by --to")
    try:
        n = migrate_to_postgres(ctx.obj["db"], url)
    except ContextStoreError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"copied {n} document(s) from {ctx.obj['db']} to {redact(url)}")
