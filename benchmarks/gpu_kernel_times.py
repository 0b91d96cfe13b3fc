"""One SmolLM2 decode step, eagerly, for Nsight Compute to time kernel by kernel (device machine only).

    ncu --metrics gpu__time_duration.sum --csv -k regex:"matvec|attn_decode|embed" python benchmarks/gpu_kernel_times.py

The prompt's prefill runs first (64 tokens); its kernels have other names except the final matvec and embed.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_decode import build  # noqa: E402

from rocmforge.registry import resolve  # noqa: E402

if __name__ == "__main__":
    ctx, arch = build(resolve("smollm2-135m"), "auto", rounding=len(sys.argv) < 2 or sys.argv[1] != "--no-rounding")
    seq = ctx.kv.new_sequence()
    batch = ctx.kv.prepare([(seq, list(range(64)))])
    ctx.ops.to_host(arch.forward(ctx, batch, rows=batch.last_rows))
    batch = ctx.kv.prepare([(seq, [1])])
    ctx.ops.to_host(arch.forward(ctx, batch, rows=batch.last_rows))
