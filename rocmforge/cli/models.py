"""``rocmforge models list|pull|path`` and ``rocmforge inspect``."""
from __future__ import annotations

import json

import click
import numpy as np

from rocmforge import registry
from rocmforge.gguf_file import GGUFFile

MIB = 1 << 20


@click.group()
def models() -> None:
    """List, fetch and locate the models rocmforge knows by name."""


@models.command("list")
def list_models() -> None:
    """Known model names, whether each is cached, and what it is."""
    for name, entry in registry.REGISTRY.items():
        mark = "cached" if registry.is_cached(name) else "-"
        default = " (default)" if name == registry.DEFAULT_MODEL else ""
        click.echo(f"{name:<14} {mark:<7} {entry.description}{default}")


@models.command("pull")
@click.argument("name")
def pull(name: str) -> None:
    """Fetch NAME into the cache (nothing happens when it is already there)."""
    click.echo(registry.pull(name, progress=True))


@models.command("path")
@click.argument("name")
def path(name: str) -> None:
    """Print where NAME is cached (fetching it first if needed)."""
    click.echo(registry.resolve(name))


def memory_plan(gguf: GGUFFile, n_ctx: int) -> dict[str, int]:
    """Bytes a run needs: weights as stored, as the CPU path holds them, KV cache at n_ctx, and the safety margin.

    The CPU path keeps norms/biases in float32 and multiplies with dequantized float32 matrices,
    so it holds every element as 4 bytes. The KV cache stores float32 keys and values per layer.
    """
    cfg = gguf.config
    stored = sum(ref.n_bytes for ref in gguf.tensors.values())
    cpu = sum(ref.n_elements * 4 for ref in gguf.tensors.values())
    kv = cfg.n_layers * cfg.n_kv_heads * (cfg.head_dim + cfg.head_dim_v) * n_ctx * 4
    margin = int(0.1 * (stored + kv)) + 100 * MIB
    return {"weights_stored": stored, "weights_cpu": cpu, "kv_cache": kv, "kv_cache_n_ctx": n_ctx,
            "margin": margin, "total_gpu": stored + kv + margin, "total_cpu": cpu + kv + margin}


def describe(gguf: GGUFFile, ctx: int | None) -> dict:
    cfg = gguf.config
    md = gguf.metadata
    n_params = int(sum(ref.n_elements for ref in gguf.tensors.values()))
    info = {
        "path": str(gguf.path),
        "name": md.get("general.name"),
        "architecture": cfg.architecture,
        "n_params": n_params,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "d_ff": cfg.d_ff,
        "context_length": cfg.context_length,
        "vocab_size": cfg.vocab_size,
        "tokenizer": md.get("tokenizer.ggml.model"),
        "tokenizer_pre": md.get("tokenizer.ggml.pre"),
        "tensor_types": {name: {"count": c, "bytes": b} for name, (c, b) in sorted(gguf.bytes_by_type().items())},
        "memory": {"at_context_length": memory_plan(gguf, cfg.context_length)},
        "config": {k: (v.item() if isinstance(v, np.generic) else v) for k, v in cfg.as_dict().items()},
    }
    if ctx:
        info["memory"][f"at_ctx_{ctx}"] = memory_plan(gguf, ctx)
    return info


@click.command()
@click.argument("model", default=registry.DEFAULT_MODEL)
@click.option("--ctx", type=int, default=None, help="Also plan memory for this context length.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(model: str, ctx: int | None, as_json: bool) -> None:
    """Architecture, sizes, tensor types, tokenizer and the memory a run of MODEL needs."""
    info = describe(GGUFFile(registry.resolve(model)), ctx)
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo(f"{info['name']}  ({info['path']})")
    click.echo(f"architecture  {info['architecture']}   parameters {info['n_params'] / 1e6:.1f} M")
    click.echo(f"layers {info['n_layers']}  d_model {info['d_model']}  heads {info['n_heads']} (kv {info['n_kv_heads']}, "
               f"head_dim {info['head_dim']})  d_ff {info['d_ff']}")
    click.echo(f"context length {info['context_length']}   vocab {info['vocab_size']} "
               f"({info['tokenizer']}, pre={info['tokenizer_pre']})")
    click.echo("tensor types  " + ", ".join(f"{t}: {v['count']} ({v['bytes'] / MIB:.1f} MiB)"
                                            for t, v in info["tensor_types"].items()))
    for label, plan in info["memory"].items():
        click.echo(f"memory {label.replace('_', ' ')} (n_ctx {plan['kv_cache_n_ctx']}): weights stored "
                   f"{plan['weights_stored'] / MIB:.1f} MiB, on CPU {plan['weights_cpu'] / MIB:.1f} MiB, "
                   f"KV cache {plan['kv_cache'] / MIB:.1f} MiB, margin {plan['margin'] / MIB:.1f} MiB "
                   f"-> GPU needs {plan['total_gpu'] / MIB:.1f} MiB")
