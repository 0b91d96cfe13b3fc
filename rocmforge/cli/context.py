"""``rocmforge context ...``: add, search, eval, list, show, rm, stats, reindex, vacuum, migrate on a context store.

    rocmforge context add docs/ notes.txt -c "a quick note"   # files, folders (by glob), text, or - for stdin
    rocmforge context search "how are deletes compacted" -k 3 --mode hybrid --json
    rocmforge context eval tests/fixtures/retrieval/pydoc      # MRR@10, nDCG@10, R@1/5/10 for each mode
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
from context_store.store import MODES
from rocmforge import registry

DEFAULT_GLOBS = ("*.md", "*.txt", "*.rst")
ADD_BATCH = 16  # documents per embedder call when adding


def bundled_docs_dir() -> Path:
    """A few short markdown notes about rocmforge itself, shipped for demos (``add --bundled-docs``)."""
    return Path(__file__).resolve().parents[1] / "data" / "docs"


def default_db() -> Path:
    return registry.home() / "context.db"


def _make_embedder(kind: str, device: str | None):
    from rocmforge.embedder import HashedNgramEmbedder, MiniLMEmbedder, default_embedder

    if kind == "hashed":
        return HashedNgramEmbedder()
    if kind == "minilm":
        return MiniLMEmbedder(device=device)
    return default_embedder(progress=sys.stderr.isatty(), device=device)


@contextmanager
def _store(ctx: click.Context, **options) -> Iterator[ContextStore]:
    """Open the store named by --db; store errors become one-line click errors (exit 1)."""
    try:
        store = ContextStore(ctx.obj["db"], embed=_make_embedder(ctx.obj["embedder"], ctx.obj["device"]), **options)
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
@click.option("--device", default="cpu", show_default=True, envvar="ROCMFORGE_EMBED_DEVICE",
              help="Where MiniLM runs: cpu, cuda, hip or auto.")
@click.pass_context
def context(ctx: click.Context, db: str | None, embedder: str, device: str) -> None:
    """A searchable store of documents (SQLite + HNSW, or PostgreSQL + pgvector) for retrieval into prompts."""
    ctx.ensure_object(dict)
    ctx.obj.update(db=db or default_db(), embedder=embedder, device=device)


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
    with _store(ctx, chunk_size=chunk_size, chunk_overlap=overlap) as store, \
            tqdm(total=len(items), desc="adding", unit="doc", disable=len(items) < 2, file=sys.stderr) as bar:
        # a few documents per store call: one embedder batch (and one transaction) for all of them
        for start in range(0, len(items), ADD_BATCH):
            part = items[start:start + ADD_BATCH]
            texts = [_read(item) if kind == "file" else item for kind, item in part]
            sources = [_source(item) if kind == "file" else f"<{kind}>" for kind, item in part]
            for result in store.add_texts(texts, sources, [dict(metadata) for _ in part], collection):
                skipped += result.skipped
                added += not result.skipped
                chunks += result.n_chunks
            bar.update(len(part))
            bar.set_postfix(chunks=chunks)
    click.echo(f"added {added} document(s), {chunks} chunk(s); skipped {skipped} already stored")


def _source(path: Path) -> str:
    """A file's source: its resolved path; a bundled note's is ``rocmforge/docs/NAME``. The source is quoted in
    the prompts built from the store, so an answer from the bundled notes would otherwise depend on where
    rocmforge is installed."""
    path = path.resolve()
    if path.is_relative_to(bundled_docs_dir()):
        return f"rocmforge/docs/{path.relative_to(bundled_docs_dir()).as_posix()}"
    return str(path)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from exc


@context.command()
@click.argument("query")
@click.option("-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--mode", type=click.Choice(MODES), default="hybrid", show_default=True)
@click.option("--collection", default=None, help="Only this collection.")
@click.option("--source", default=None, help="Only sources matching this glob.")
@click.option("-w", "--where", "where", multiple=True, help="key=value metadata filter (repeatable).")
@click.option("--ef", type=click.IntRange(min=1), default=128, show_default=True, help="HNSW search breadth.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per hit per line (NDJSON).")
@click.pass_context
def search(ctx: click.Context, query: str, k: int, mode: str, collection: str | None, source: str | None,
           where: tuple[str, ...], ef: int, as_json: bool) -> None:
    """Search the store: hybrid (cosine and keyword score of both lists' candidates, mixed), rrf (reciprocal-rank
    fusion), vector (HNSW) or keyword (BM25)."""
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


@context.command("eval")
@click.argument("datasets", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--modes", default=",".join(MODES), show_default=True, help="Comma-separated search modes.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per set and mode per line.")
@click.pass_context
def eval_(ctx: click.Context, datasets: tuple[Path, ...], modes: str, as_json: bool) -> None:
    """Retrieval quality on labelled sets in BEIR's format (corpus.jsonl, queries.jsonl, qrels/test.tsv).

    Each set goes into its own collection of the store (--db; a temporary file when not given, and passages
    already stored are not embedded again), then every query is searched in every mode. Prints MRR@10,
    nDCG@10 and R@1/5/10 (share of queries with a relevant passage in the first k) per mode.
    """
    import tempfile

    from context_store.evaluate import Evaluation, RetrievalSet, format_table

    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODES]
    if unknown or not chosen:
        raise click.ClickException(f"unknown mode(s) {', '.join(unknown) or '(none)'}; use {', '.join(MODES)}")
    try:
        sets = [RetrievalSet.load(folder) for folder in datasets]
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    with tempfile.TemporaryDirectory() as scratch:
        if ctx.parent.params.get("db") is None:  # no --db: a scratch store
            ctx.obj["db"] = Path(scratch) / "eval.db"
        with _store(ctx) as store:
            for dataset in sets:
                progress = lambda batches: tqdm(batches, desc=f"adding {dataset.name}", unit="batch",  # noqa: E731
                                                file=sys.stderr, disable=not sys.stderr.isatty())
                evaluation = Evaluation(store, dataset, collection=f"eval-{dataset.name}", progress=progress)
                results = {mode: evaluation.run(mode) for mode in chosen}
                if as_json:
                    for mode, metrics in results.items():
                        click.echo(json.dumps({"set": dataset.name, "mode": mode, "queries": len(dataset.queries),
                                               "passages": len(dataset.corpus), **metrics}))
                else:
                    click.echo(format_table(results, f"{dataset.name}: {len(dataset.corpus)} passages, "
                                                     f"{len(dataset.queries)} queries"))


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
