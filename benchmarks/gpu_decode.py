"""GPU prefill (pp512) and decode (tg128) speed, llama-bench style, plus a per-kernel profile of one decode step.

    python benchmarks/gpu_decode.py [model] [--json out.json]

pp512: one forward over 512 tokens of a fresh sequence (eager launches), median of 5 after a warm-up.
tg128: 128 single-token steps after a 16-token prompt, each a replayed device graph; greedy with the argmax
on the device (4 bytes back per token) and, separately, with the full logits row copied to the host as the
engine's sampler needs it. Times are host wall clock around fully synchronized work. Then the captured graph's
replay alone (device events), and a per-kernel profile of the 512-token prefill and a decode step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rocmforge.arch.context import ForwardContext  # noqa: E402
from rocmforge.backends.profiler import profile_model  # noqa: E402
from rocmforge.backends.select import backend_for_model  # noqa: E402
from rocmforge.gguf_file import GGUFFile  # noqa: E402
from rocmforge.hooks import Hooks  # noqa: E402
from rocmforge.kv_cache import KVCache  # noqa: E402
from rocmforge.model import ARCHITECTURES  # noqa: E402
from rocmforge.registry import resolve  # noqa: E402

N_CTX = 1024


def build(path: Path, device: str, rounding: bool):
    gguf = GGUFFile(path)
    cfg = gguf.config
    ops = backend_for_model(device, gguf, N_CTX)
    ops.round_activations = rounding  # read when the weights load, just below
    from rocmforge.weights import Weights
    kv = KVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim_v, N_CTX, block_size=16, ops=ops)
    return ForwardContext(cfg, Weights.load(gguf, ops), ops, kv, Hooks(ops)), ARCHITECTURES[cfg.architecture]


def prefill_seconds(ctx, arch, n_tokens: int, rng) -> float:
    seq = ctx.kv.new_sequence()
    batch = ctx.kv.prepare([(seq, list(rng.integers(0, ctx.cfg.vocab_size, n_tokens)))])
    start = time.perf_counter()
    ctx.ops.to_host(arch.forward(ctx, batch, rows=batch.last_rows))
    elapsed = time.perf_counter() - start
    ctx.kv.free(seq)
    return elapsed


def decode_seconds(ctx, arch, n_tokens: int, device_argmax: bool) -> tuple[float, list[int]]:
    ops = ctx.ops
    seq = ctx.kv.new_sequence()
    batch = ctx.kv.prepare([(seq, list(range(100, 116)))])
    token = int(np.argmax(ops.to_host(arch.forward(ctx, batch, rows=batch.last_rows))[-1]))
    tokens = []
    start = time.perf_counter()
    for _ in range(n_tokens):
        batch = ctx.kv.prepare([(seq, [token])])
        if device_argmax:
            step = lambda batch=batch: ops.argmax(arch.forward(ctx, batch, rows=batch.last_rows))  # noqa: E731
            token = int(ops.to_host(ops.graph_step(batch, step))[0])
        else:
            step = lambda batch=batch: arch.forward(ctx, batch, rows=batch.last_rows)  # noqa: E731
            token = int(np.argmax(ops.to_host(ops.graph_step(batch, step))[-1]))
        tokens.append(token)
    elapsed = time.perf_counter() - start
    ctx.kv.free(seq)
    return elapsed, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-rounding", action="store_true",
                        help="float32 activations into every matmul instead of llama.cpp's 8-bit rounding")
    args = parser.parse_args()
    path = resolve(args.model)
    ctx, arch = build(path, args.device, not args.no_rounding)
    ops = ctx.ops
    device = getattr(getattr(ops, "rt", None), "device_name", "cpu")
    rng = np.random.default_rng(0)
    prefill_seconds(ctx, arch, 512, rng)  # warm-up: compiles kernels, fills the pools
    pp = [512 / prefill_seconds(ctx, arch, 512, rng) for _ in range(5)]
    decode_seconds(ctx, arch, 8, True)  # warm-up and graph capture
    tg_argmax = [128 / decode_seconds(ctx, arch, 128, True)[0] for _ in range(3)]
    decode_seconds(ctx, arch, 8, False)
    tg_logits = [128 / decode_seconds(ctx, arch, 128, False)[0] for _ in range(3)]
    replay_ms = ops.replay_ms() if hasattr(ops, "replay_ms") else None
    profile = profile_model(ctx, arch, list(rng.integers(0, ctx.cfg.vocab_size, 512)), n_tokens=4)
    by_kernel, prefill_by_kernel = profile.by_kernel("decode 3"), profile.by_kernel("prefill")
    result = {
        "model": path.name, "device": device, "date": time.strftime("%Y-%m-%d"),
        "activation_rounding": not args.no_rounding,
        "pp512_tok_s": statistics.median(pp), "pp512_runs": pp,
        "tg128_tok_s_device_argmax": statistics.median(tg_argmax), "tg128_runs_device_argmax": tg_argmax,
        "tg128_tok_s_logits_to_host": statistics.median(tg_logits), "tg128_runs_logits_to_host": tg_logits,
        "graph_replay_ms_per_token": replay_ms,
        "decode_step_kernel_ms": sum(ms for _, ms in by_kernel.values()),
        "decode_step_launches": sum(n for n, _ in by_kernel.values()),
        "decode_kernels": {k: {"count": n, "total_ms": ms} for k, (n, ms) in by_kernel.items()},
        "prefill512_kernels": {k: {"count": n, "total_ms": ms} for k, (n, ms) in prefill_by_kernel.items()},
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"{path.name} on {device}, activations {'rounded as llama.cpp does' if not args.no_rounding else 'float32'}")
    print(f"pp512: {result['pp512_tok_s']:,.0f} tok/s   tg128: {result['tg128_tok_s_device_argmax']:,.0f} tok/s "
          f"(device argmax), {result['tg128_tok_s_logits_to_host']:,.0f} tok/s (logits to host)")
    if replay_ms is not None:
        print(f"decode graph replay alone: {replay_ms * 1e3:.0f} us per token ({1e3 / replay_ms:,.0f} tok/s)")
    print(f"one eager decode step (position 515): {result['decode_step_launches']} kernels, "
          f"{result['decode_step_kernel_ms']:.3f} ms of device time")
    for title, table in (("decode step", by_kernel), ("512-token prefill", prefill_by_kernel)):
        print(f"{title}, by kernel (device events, launches queued behind a spin kernel):")
        for kernel, (n, ms) in sorted(table.items(), key=lambda kv: -kv[1][1])[:10]:
            print(f"  {kernel:28s} {n:4d} launches {ms * 1e3:9.1f} us")


if __name__ == "__main__":
    main()
