"""``rocmforge batch generate|score``: a dataset through the model.

    rocmforge batch generate prompts.txt --out completions.jsonl -m smollm2-135m --max-tokens 64
    rocmforge batch score texts.jsonl --out scores.jsonl
"""
from __future__ import annotations

from pathlib import Path

import click

from rocmforge.registry import DEFAULT_MODEL


@click.command()
@click.argument("task", type=click.Choice(["generate", "score"]))
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Results (JSON lines).")
@click.option("-m", "--model", "model_name", default=DEFAULT_MODEL, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--n-ctx", default=2048, show_default=True, type=click.IntRange(16))
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(1), help="generate: new tokens.")
def batch(task: str, source: Path, out: Path, model_name: str, device: str, n_ctx: int, max_tokens: int) -> None:
    """Generate a continuation of (greedy), or score, every text of SOURCE (one per line, or .jsonl "text")."""
    from rocmforge.batch_jobs import read_texts, run_batch, write_results
    from rocmforge.model import load

    rows = run_batch(load(model_name, device=device, n_ctx=n_ctx, n_parallel=1), task, read_texts(source), max_tokens)
    write_results(rows, out)
    click.echo(f"{len(rows)} result(s) -> {out}")
