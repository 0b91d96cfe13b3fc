"""``rocmforge harvest TEXT_FILE -n NAME -o DIR``: activations of every token of a dataset, to shards on disk."""
from __future__ import annotations

import click

from rocmforge.cli.types import DEVICE
from rocmforge.registry import DEFAULT_MODEL


@click.command()
@click.argument("text_file", type=click.Path(exists=True, dir_okay=False))
@click.option("-n", "--name", "names", multiple=True, required=True,
              help="Hook point to keep, e.g. blocks.15.hook_resid_post (repeat for several).")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Directory for shards + index.json.")
@click.option("-m", "--model", "model_name", default=DEFAULT_MODEL, show_default=True,
              help="Registry name or path to a .gguf file.")
@click.option("--device", default="auto", show_default=True, type=DEVICE, help="auto, cpu, cpu-exact, cuda or hip.")
@click.option("--batch-tokens", default=4096, show_default=True, help="Tokens per batched forward.")
@click.option("--shard-tokens", default=1 << 16, show_default=True, help="Rows per shard file.")
@click.option("--n-ctx", default=None, type=int, help="Context window (longer documents are cut into pieces).")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "npy"]), default="safetensors", show_default=True)
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Run the forwards on Ray Data with this many actors (one per GPU, else one per CPU); the same "
                   "shards [default: this process].")
@click.option("--ray-address", default=None, help="With --workers: the Ray cluster to join [default: a local one].")
def harvest(text_file: str, names: tuple[str, ...], out: str, model_name: str, device: str, batch_tokens: int,
            shard_tokens: int, n_ctx: int | None, fmt: str, workers: int | None, ray_address: str | None) -> None:
    """Run every line of TEXT_FILE (one document per line) and write the chosen activations to OUT.

    Killed and started again with the same arguments, it resumes after the last finished shard (with or without
    --workers: both write the same files)."""
    n_ctx = n_ctx or 2048
    n_parallel = max(1, -(-batch_tokens // n_ctx))
    options = {"batch_tokens": batch_tokens, "shard_tokens": shard_tokens, "format": fmt}
    try:
        if workers is None:
            from rocmforge.harvest import harvest as run
            from rocmforge.model import load

            model = load(model_name, device=device, n_ctx=n_ctx, n_parallel=n_parallel)
            index = run(model, text_file, list(names), out, **options)
        else:
            from rocmforge.harvest import harvest_on_ray
            from rocmforge.ray_start import start_ray

            start_ray(ray_address)
            index = harvest_on_ray(model_name, text_file, list(names), out, workers, device=device, n_ctx=n_ctx,
                                   n_parallel=n_parallel, **options)
    except (KeyError, ValueError) as exc:  # a misspelt hook name, or OUT holds a harvest with other settings
        raise click.UsageError(str(exc.args[0])) from None
    rows = sum(s["rows"] for s in index["shards"])
    click.echo(f"{rows} tokens in {len(index['shards'])} shards under {out}")
