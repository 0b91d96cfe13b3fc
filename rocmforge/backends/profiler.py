"""Where the time of a generation goes: per layer and per kernel, for the prefill and each decode step.

On a GPU every kernel is bracketed by device events (``GpuBackend.profile``); on the CPU every op call is timed
with the wall clock. Both give rows ``(step, layer, kernel, ms)``; ``Profile`` sums them by layer or by kernel,
prints a table and draws a bar chart.

>>> from rocmforge.backends.profiler import Profile, ProfileRow
>>> p = Profile("cpu", [ProfileRow("decode 0", "layer 0", "matmul", 0.5), ProfileRow("decode 0", "layer 0", "add", 0.1)])
>>> round(p.by_layer()["layer 0"], 3), p.by_kernel()["matmul"]
(0.6, (1, 0.5))
"""
from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ProfileRow:
    step: str      # "prefill" or "decode <i>"
    layer: str     # "embed", "layer <i>", "unembed"
    kernel: str    # kernel name on GPU, op name on CPU
    ms: float


@dataclass
class Profile:
    device: str
    rows: list[ProfileRow]

    @property
    def total_ms(self) -> float:
        return sum(r.ms for r in self.rows)

    def by_layer(self, step_prefix: str = "") -> dict[str, float]:
        """Milliseconds per layer, summed over the steps whose name starts with ``step_prefix``."""
        totals: dict[str, float] = defaultdict(float)
        for r in self.rows:
            if r.step.startswith(step_prefix):
                totals[r.layer] += r.ms
        return dict(totals)

    def by_kernel(self, step_prefix: str = "") -> dict[str, tuple[int, float]]:
        """(calls, milliseconds) per kernel, summed over the matching steps."""
        totals: dict[str, list] = defaultdict(lambda: [0, 0.0])
        for r in self.rows:
            if r.step.startswith(step_prefix):
                totals[r.kernel][0] += 1
                totals[r.kernel][1] += r.ms
        return {k: (n, ms) for k, (n, ms) in totals.items()}

    def table(self, top: int = 12) -> str:
        """A text table: time per step kind, then the kernels that take the most time."""
        lines = [f"profile on {self.device}: {self.total_ms:.3f} ms in {len(self.rows)} kernel/op calls"]
        for prefix, title in (("prefill", "prefill"), ("decode", "decode (all steps)")):
            kernels = self.by_kernel(prefix)
            if not kernels:
                continue
            lines.append(f"{title}: {sum(ms for _, ms in kernels.values()):.3f} ms")
            for name, (n, ms) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
                lines.append(f"  {name:28s} {n:6d} calls {ms:10.3f} ms")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, step_prefix: str = "decode", ax: Any = None) -> Any:
        """Bar chart of milliseconds per layer (matplotlib); returns the axes."""
        import matplotlib.pyplot as plt
        layers = self.by_layer(step_prefix)
        ax = ax or plt.subplots(figsize=(10, 3))[1]
        ax.bar(range(len(layers)), list(layers.values()))
        ax.set_xticks(range(len(layers)), list(layers), rotation=90, fontsize=7)
        ax.set_ylabel("ms")
        ax.set_title(f"{step_prefix or 'all'} time per layer on {self.device}")
        return ax


class _WallClockOps:
    """Wraps a backend so every op call appends (label, op, ms) to ``sink``; on the CPU ops are synchronous."""

    def __init__(self, ops: Any, sink: list[tuple[str, str, float]]):
        self._ops, self._sink, self.profile_label = ops, sink, ""

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._ops, name)
        if not callable(attr) or name.startswith(("load_", "zeros", "from_host", "to_host")):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = attr(*args, **kwargs)
            self._sink.append((self.profile_label, name, (time.perf_counter() - start) * 1e3))
            return result
        return timed


def _profiled_forward(ctx: Any, arch: Any, batch: Any) -> tuple[Any, list[tuple[str, str, float]]]:
    """One forward (last row's logits) with every kernel/op timed and labelled by layer."""
    gpu = hasattr(ctx.ops, "profile")
    sink: list[tuple[str, str, float]] = []
    ops = ctx.ops if gpu else _WallClockOps(ctx.ops, sink)
    run_ctx = ctx if gpu else dataclasses.replace(ctx, ops=ops)

    def run() -> Any:
        ops.profile_label = "embed"
        resid = arch.embed(run_ctx, batch.tokens)
        for layer in range(ctx.cfg.n_layers):
            ops.profile_label = f"layer {layer}"
            resid = arch.block(run_ctx, layer, resid, batch)
        ops.profile_label = "unembed"
        return arch.unembed(run_ctx, run_ctx.ops.take_rows(resid, batch.last_rows))

    if gpu:
        return ctx.ops.profile(run)
    return run(), sink


def profile_model(ctx: Any, arch: Any, ids: Sequence[int], n_tokens: int,
                  device: str | None = None) -> Profile:
    """Profile the prefill of ``ids`` and ``n_tokens`` greedy decode steps on ``ctx`` (a ``ForwardContext``).

    ``arch`` is the architecture module (``rocmforge.arch.llama`` ...). The sequence is freed afterwards.
    """
    rows: list[ProfileRow] = []
    seq = ctx.kv.new_sequence()
    try:
        feed: list[int] = list(ids)
        for step in ["prefill"] + [f"decode {i}" for i in range(n_tokens)]:
            batch = ctx.kv.prepare([(seq, feed)])
            logits, timed = _profiled_forward(ctx, arch, batch)
            rows += [ProfileRow(step, layer, kernel, ms) for layer, kernel, ms in timed]
            feed = [int(np.argmax(ctx.ops.to_host(logits)[-1]))]
    finally:
        ctx.kv.free(seq)
    name = device or getattr(getattr(ctx.ops, "rt", None), "device_name", ctx.ops.name)
    return Profile(name, rows)

