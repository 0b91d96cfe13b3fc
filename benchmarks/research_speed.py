"""Research at the backend's speed: run_with_cache with every hook point, a full residual patching sweep, and
activation harvesting, each next to its peer in the same process.

- cache:   ``run_with_cache`` of 512 random tokens, every hook point (median of rounds); peer on a GPU: HF transformers
           loading the same GGUF (``output_hidden_states=True, output_attentions=True``, eager attention, float32);
           on the CPU: the plain forward (what the cache adds).
- sweep:   residual patching over every (layer, position) of a 20-token prompt: the batched sweep vs one patched
           run at a time (``max_batch=1``, timed on ``--old-layers`` layers and scaled to all).
- harvest: ``blocks.15.hook_resid_post`` over documents of 512 random tokens, ``--batch-tokens`` per forward, to
           shards in a temporary directory; peer: HF ``output_hidden_states`` with the same batch shape, each
           batch's hidden state copied to the host (GPU), or the same batched forward without capture (CPU).
           Peak RSS (ru_maxrss) after ``--rss-at`` tokens.

    python benchmarks/research_speed.py --model smollm2-135m --device cpu --harvest-tokens 20000
    python benchmarks/research_speed.py --model twin.gguf --device cuda --hf      # on the lent GPU

Prints one table at the end (device, UTC time, times, ratios).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import rocmforge
from rocmforge.patching import logit_diff, patch_residual

ROWS: list[tuple[str, str, str, str]] = []


def _sync(model: rocmforge.Model) -> None:
    rt = getattr(model.ops, "rt", None)
    if rt is not None:
        rt.synchronize()


def _median(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_cache(model: rocmforge.Model, hf, rounds: int) -> None:
    ids = np.random.default_rng(0).integers(100, model.cfg.vocab_size - 100, 512).tolist()

    def ours():
        out, cache = model.run_with_cache(ids)
        _sync(model)
        return cache
    ours()  # warm-up: kernels compiled, pools filled
    mine = _median(ours, rounds)
    plain = _median(lambda: model.forward(ids), rounds)
    ROWS.append(("cache 512 tok, all hook points", f"{mine * 1e3:.1f} ms", f"plain forward {plain * 1e3:.1f} ms",
                 f"{mine / plain:.2f}x forward"))
    if hf is not None:
        import torch
        x = torch.tensor([ids], device="cuda")

        def theirs():
            with torch.no_grad():
                o = hf(x, output_hidden_states=True, output_attentions=True)
            torch.cuda.synchronize()
            return o
        theirs()
        peer = _median(theirs, rounds)
        ROWS.append(("cache 512 tok vs HF", f"{mine * 1e3:.1f} ms", f"HF {peer * 1e3:.1f} ms",
                     f"{mine / peer:.2f}x HF's time"))


def bench_sweep(model: rocmforge.Model, old_layers: int) -> None:
    rng = np.random.default_rng(1)
    clean = rng.integers(100, model.cfg.vocab_size - 100, 20).tolist()
    corrupted = list(clean)
    corrupted[7] = clean[7] + 1
    metric = logit_diff(5, 6)
    patch_residual(model, clean, corrupted, metric, layers=[model.cfg.n_layers - 1])  # warm-up
    t = time.perf_counter()
    grid = patch_residual(model, clean, corrupted, metric)
    _sync(model)
    batched = time.perf_counter() - t
    n = model.cfg.n_layers  # layers spread so their mean start is the sweep's mean, (n - 1) / 2
    layers = sorted({min(n - 1, int((i + 0.5) * n / old_layers)) for i in range(old_layers)})
    t = time.perf_counter()
    old = patch_residual(model, clean, corrupted, metric, layers=layers, max_batch=1)
    _sync(model)
    alone = (time.perf_counter() - t) * model.cfg.n_layers / len(layers)
    diff = float(np.abs(grid[layers] - old).max())
    ROWS.append((f"sweep {grid.shape[0]}x{grid.shape[1]} = {grid.size} patched runs", f"{batched:.2f} s",
                 f"one at a time ~{alone:.1f} s (from {len(layers)} layers)",
                 f"{alone / batched:.1f}x faster; max |diff| {diff:.3g}"))


def _docs(n_tokens: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(2)
    return [rng.integers(100, vocab - 100, 512).tolist() for _ in range(n_tokens // 512)]


def bench_harvest(model: rocmforge.Model, hf, n_tokens: int, batch_tokens: int, rss_at: list[int], name: str,
                  shard_tokens: int) -> None:
    layer = int(name.split(".")[1]) + 1  # the blocks a capture of ``name`` runs, for the peer
    rss = {}
    with tempfile.TemporaryDirectory() as out:
        model.harvest(_docs(batch_tokens, model.cfg.vocab_size), [name], Path(out) / "warm", batch_tokens=batch_tokens,
                      progress=False)
        done, spent = 0, 0.0
        for target in sorted(set(rss_at + [n_tokens])):
            docs = _docs(target - done, model.cfg.vocab_size)
            t = time.perf_counter()
            model.harvest(docs, [name], Path(out) / f"h{target}", batch_tokens=batch_tokens, format="npy",
                          shard_tokens=shard_tokens, progress=False)
            spent += time.perf_counter() - t
            done = target
            rss[target] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            for f in (Path(out) / f"h{target}").iterdir():
                f.unlink()  # keep the disk free; the shards were written and counted
    ours = done / spent
    ROWS.append((f"harvest {name}, {done} tok", f"{ours:,.0f} tok/s",
                 "peak RSS " + ", ".join(f"{k // 1000}k tok: {v:.0f} MB" for k, v in rss.items()), ""))
    docs = _docs(min(n_tokens, 16 * batch_tokens), model.cfg.vocab_size)
    per_batch = max(1, batch_tokens // 512)
    if hf is not None:
        import torch

        def theirs():
            for i in range(0, len(docs), per_batch):
                x = torch.tensor(docs[i:i + per_batch], device="cuda")
                with torch.no_grad():
                    h = hf(x, output_hidden_states=True).hidden_states[layer]
                h.cpu().numpy()
        theirs()
        t = time.perf_counter()
        theirs()
        peer = len(docs) * 512 / (time.perf_counter() - t)
        ROWS.append(("harvest vs HF output_hidden_states", f"{ours:,.0f} tok/s", f"HF {peer:,.0f} tok/s",
                     f"{ours / peer:.2f}x HF"))
    else:  # the same batches with and without capture, alternating, so machine load hits both alike
        spent = {"harvest": 0.0, "forward": 0.0}
        with tempfile.TemporaryDirectory() as out:
            for r, i in enumerate(range(0, len(docs), per_batch)):
                chunk = docs[i:i + per_batch]
                for side in (("harvest", "forward") if r % 2 == 0 else ("forward", "harvest")):
                    t = time.perf_counter()
                    if side == "harvest":
                        model.harvest(chunk, [name], Path(out) / f"r{r}", batch_tokens=batch_tokens, progress=False)
                    else:
                        model.run_batch(chunk, stop_at_layer=layer)
                    spent[side] += time.perf_counter() - t
        n = len(docs) * 512
        ROWS.append(("harvest vs same forward, no capture (alternating)", f"{n / spent['harvest']:,.0f} tok/s",
                     f"forward {n / spent['forward']:,.0f} tok/s", f"{spent['forward'] / spent['harvest']:.2f}x"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--hf", action="store_true", help="time HF transformers on the same GGUF (GPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--old-layers", type=int, default=2)
    parser.add_argument("--harvest-tokens", type=int, default=1 << 20)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--rss-at", type=int, nargs="*", default=[100_000])
    parser.add_argument("--name", default="blocks.15.hook_resid_post", help="the hook point harvested")
    parser.add_argument("--shard-tokens", type=int, default=1 << 16)
    parser.add_argument("--only", nargs="*", default=["cache", "sweep", "harvest"])
    args = parser.parse_args()
    n_ctx = 1024
    model = rocmforge.load(args.model, device=args.device, n_ctx=n_ctx, n_parallel=args.batch_tokens // n_ctx + 1)
    hf = None
    if args.hf:
        import torch
        from transformers import AutoModelForCausalLM
        path = Path(rocmforge.registry.pull(args.model) if not Path(args.model).exists() else args.model)
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                  attn_implementation="eager").cuda().eval()
    for part in args.only:
        t = time.perf_counter()
        if part == "cache":
            bench_cache(model, hf, args.rounds)
        elif part == "sweep":
            bench_sweep(model, args.old_layers)
        elif part == "harvest":
            bench_harvest(model, hf, args.harvest_tokens, args.batch_tokens, args.rss_at, args.name, args.shard_tokens)
        print(f"[{part} took {time.perf_counter() - t:.1f} s]", flush=True)
        _table(model, args.model)  # after each part: a run cut short still reports what it finished


def _table(model: rocmforge.Model, name: str) -> None:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{model.ops.name} ({getattr(getattr(model.ops, 'rt', None), 'device_name', 'cpu')}), {when}, {name}")
    print("| what | rocmforge | peer | ratio |\n|---|---|---|---|")
    for row in ROWS:
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
