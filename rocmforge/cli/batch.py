"""``rocmforge batch generate|score``: a dataset through the model, in this process or on Ray Data.

    rocmforge batch generate prompts.txt --out completions.jsonl -m smollm2-135m --max-tokens 64
    rocmforge batch score texts.jsonl --out scores.jsonl --workers 4 --ray-address auto   # one actor per GPU/CPU
"""
from __future__ import annotations

from pathlib import Path

import click

from rocmforge.cli.types import DEVICE
from rocmforge.registry import DEFAULT_MODEL


@click.command()
@click.argument("task", type=click.Choice(["generate", "score"]))
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Results (JSON lines).")
@click.option("-m", "--model", "model_name", default=DEFAULT_MODEL, show_default=True)
@click.option("--device", default="auto", show_default=True, type=DEVICE)
@click.option("--n-ctx", default=2048, show_default=True, type=click.IntRange(16))
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(1), help="generate: new tokens.")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Run on Ray Data with this many actors (one per GPU, else one per CPU) [default: this process].")
@click.option("--ray-address", default=None, help="With --workers: the Ray cluster to join [default: a local one].")
def batch(task: str, source: Path, out: Path, model_name: str, device: str, n_ctx: int, max_tokens: int,
          workers: int | None, ray_address: str | None) -> None:
    """Generate a continuation of (greedy), or score, every text of SOURCE (one per line, or .jsonl "text")."""
    from rocmforge.batch_jobs import on_ray, read_texts, run_batch, write_results

    texts = read_texts(source)
    if workers is None:
        from rocmforge.model import load

        rows = run_batch(load(model_name, device=device, n_ctx=n_ctx, n_parallel=1), task, texts, max_tokens)
    else:
        from rocmforge.ray_start import start_ray

        start_ray(ray_address)
        rows = on_ray(task, model_name, texts, workers, device=device, n_ctx=n_ctx, max_new_tokens=max_tokens)
    write_results(rows, out)
    click.echo(f"{len(rows)} result(s) -> {out}")
