"""A numpy backend whose matmul gives each row the same bits whatever else is in the batch.

Why the server needs it: OpenBLAS picks its kernel, its blocking and its thread split from the number of rows,
so a row's result depends on how many rows share the call and where it sits among them. Measured here
(OpenBLAS 0.3.31, Haswell kernels): with 2 threads, 1 row, 2-6, 7-16 and 17-32 rows each round differently;
with 1 thread, rows 6-15 of a 16-row call round differently from rows 0-5. So a sequence decoded in a batch
of 16 gets logits that differ in the last bits from the same sequence decoded alone, and greedy decoding can
pick another token at a near tie. Multiplying in fixed tiles of ``TILE`` = 8 rows (the last tile zero-padded)
makes every row's result independent of the batch: 8-row calls gave identical bits for a row at every position,
with any other rows, at 1 and 2 threads (tests/test_server.py checks this on the real weights). Attention
already runs one sequence at a time, and the scheduler cuts prompts at fixed chunk boundaries, so with this
backend a whole forward is batch-invariant: "same seed, same text, alone or batched" holds bit for bit.

The price: a lone decoding sequence pays for an 8-row product, and a batch of 16 reads the weights twice
(see BENCHMARKS.md, "Server", for both with and without it).

>>> import numpy as np
>>> from gguf import GGMLQuantizationType
>>> from rocmforge.backends.cpu import CpuWeight
>>> w = CpuWeight(np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32), GGMLQuantizationType.F32)
>>> x = np.random.default_rng(1).standard_normal((20, 32)).astype(np.float32)
>>> backend = BatchInvariantCpuBackend()
>>> bool(np.array_equal(backend.matmul(x, w)[11], backend.matmul(x[11:12], w)[0]))
True
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rocmforge.backends.cpu import CpuBackend

TILE = 8


class BatchInvariantCpuBackend(CpuBackend):
    """``CpuBackend`` whose matmul runs the parent's on fixed tiles of ``TILE`` rows (see the module docstring)."""

    def matmul(self, x: np.ndarray, weight: Any) -> np.ndarray:
        n = x.shape[0]
        parts = []
        for start in range(0, n, TILE):
            rows = min(TILE, n - start)
            tile = np.zeros((TILE, x.shape[1]), dtype=np.float32)
            tile[:rows] = x[start:start + rows]
            parts.append(super().matmul(tile, weight)[:rows])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


def use_batch_invariant_matmul(model: Any) -> bool:
    """Swap a CPU model's backend for ``BatchInvariantCpuBackend`` (same weights and cache); False if not on CPU."""
    if type(model.ops) is not CpuBackend:
        return False
    backend = BatchInvariantCpuBackend.__new__(BatchInvariantCpuBackend)
    backend.__dict__.update(vars(model.ops))  # the same settings (activation rounding) as the backend it replaces
    model.ops = model.ctx.ops = backend
    return True
