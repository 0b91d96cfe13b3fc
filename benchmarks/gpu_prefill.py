"""GPU prefill (pp512) with the many-row matmuls on the matrix units (kernels/matmul_mma.hip) against the float32
tiles (kernels/matmul.hip) in the same process, rounds alternating, plus where a 512-token prefill spends its
device time. Speed depends on shapes and types only, so a shape twin (benchmarks/shape_twin.py) times as the real
model does.

    python benchmarks/gpu_prefill.py MODEL_OR_PATH [MODEL_OR_PATH ...] [--rounds 5] [--json out.json]

pp512: one forward over 512 tokens of a fresh sequence, host wall clock around fully synchronized work (as
benchmarks/gpu_decode.py and llama-bench time it). The per-kernel profile brackets every launch with device events.
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

from benchmarks.gpu_decode import build, prefill_seconds  # noqa: E402
from rocmforge.backends import gpu_mma  # noqa: E402
from rocmforge.backends.profiler import profile_model  # noqa: E402
from rocmforge.registry import resolve  # noqa: E402


def measure(model: str, rounds: int) -> dict:
    path = resolve(model)
    ctx, arch = build(path, "auto", True)
    rng = np.random.default_rng(0)
    matrix_types = gpu_mma.MMA_TYPES
    times: dict[str, list[float]] = {"matrix units": [], "float32 tiles": []}
    try:
        for _ in range(rounds + 1):  # the first round is a warm-up (compiles kernels, fills the pools)
            for name, types in (("matrix units", matrix_types), ("float32 tiles", frozenset())):
                gpu_mma.MMA_TYPES = types
                times[name].append(512 / prefill_seconds(ctx, arch, 512, rng))
        gpu_mma.MMA_TYPES = matrix_types
        device_start = time.perf_counter()
        profile = profile_model(ctx, arch, list(rng.integers(0, ctx.cfg.vocab_size, 512)), n_tokens=0)
        profiled_s = time.perf_counter() - device_start
    finally:
        gpu_mma.MMA_TYPES = matrix_types
    pp = {name: statistics.median(runs[1:]) for name, runs in times.items()}
    kernels = profile.by_kernel("prefill")
    return {"model": path.name, "device": ctx.ops.rt.device_name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "pp512_tok_s": pp, "runs": times, "speedup": pp["matrix units"] / pp["float32 tiles"],
            "prefill_device_ms": profile.total_ms, "prefill_profiled_wall_ms": profiled_s * 1e3,
            "prefill_kernels": {k: {"count": n, "total_ms": ms} for k, (n, ms) in kernels.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = [measure(m, args.rounds) for m in args.models]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    for r in results:
        print(f"{r['model']} on {r['device']} ({r['date']}): 512-token prefill kernels {r['prefill_device_ms']:.2f} ms of "
              f"device time; by kernel:")
        for kernel, v in sorted(r["prefill_kernels"].items(), key=lambda kv: -kv[1]["total_ms"])[:8]:
            print(f"  {kernel:28s} {v['count']:4d} launches {v['total_ms'] * 1e3:9.1f} us")
    print(f"{'model':40s} {'pp512 matrix units':>19s} {'pp512 float32 tiles':>20s} {'ratio':>6s}")
    for r in results:
        pp = r["pp512_tok_s"]
        print(f"{r['model']:40s} {pp['matrix units']:19,.0f} {pp['float32 tiles']:20,.0f} {r['speedup']:6.2f}")


if __name__ == "__main__":
    main()
