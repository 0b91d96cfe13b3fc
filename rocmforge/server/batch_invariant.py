"""A numpy backend whose matmul gives each row the same bits whatever else is in the batch.

Why the server needs it: OpenBLAS picks its kernel, its blocking and its thread split from the shape of the
call, so a row's result can depend on how many rows share the call and where it sits among them. Measured here
(OpenBLAS 0.3.31) for ``x @ W.T`` with the activations ``x`` as the left operand: with the Haswell kernels and 1
thread, rows 6-15 of a 16-row call round differently from rows 0-5; with 2 threads 1, 2-6, 7-16 and 17-32 rows
each round differently. With the weight as the left operand, ``(W @ x.T).T``, and the activations as the
columns, a call of a *fixed* number of columns gave every column the same bits at any position among any others
(tiles of 8 and 16 columns, Haswell and SkylakeX kernels, 1 and 2 threads, every SmolLM2 weight shape; a varying
column count does not: 1 column goes to GEMV, and the SkylakeX kernels round small counts differently). So the
product runs on tiles of exactly ``TILE`` = 16 rows, the last one zero-padded. Attention already runs one
sequence at a time and the scheduler cuts prompts at fixed chunk boundaries, so with this backend a whole
forward is batch-invariant: "same seed, same text, alone or batched" holds bit for bit (tests/test_server.py).

Why weight-left tiles of 16: OpenBLAS then streams each weight once for a whole 16-sequence decode step, and
its SkylakeX kernel multiplies a 16-column weight-left product about 2x faster than 8 activation-left rows
(BENCHMARKS.md, "Server"). A lone stream pays for 16 rows, which costs little more than one: the step is bound
by reading the weights.

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

from rocmforge.backends.cpu import CpuBackend, CpuWeight

TILE = 16


class BatchInvariantCpuBackend(CpuBackend):
    """``CpuBackend`` whose matmul multiplies fixed tiles of ``TILE`` rows, weight on the left (see the module
    docstring). Weights stored as one group (q/k/v, gate/up) are multiplied as the group at any row count:
    one call instead of three, and the same call alone or batched."""

    def matmul(self, x: np.ndarray, weight: CpuWeight) -> np.ndarray:
        if self.round_activations:
            x = self._rounded(x, weight.ggml_type)
        if weight.group is None:
            return invariant_product(x, weight.matrix)
        last = self._last_group
        if last is None or last[0] is not x or last[1] is not weight.group:
            last = self._last_group = (x, weight.group, invariant_product(x, weight.group))
        return last[2][:, weight.rows]


def invariant_product(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``x @ matrix.T`` (``[n, in] x [out, in] -> [n, out]``) with each row's bits independent of the others.

    >>> import numpy as np
    >>> w = np.arange(6, dtype=np.float32).reshape(3, 2)
    >>> invariant_product(np.ones((1, 2), np.float32), w).tolist()
    [[1.0, 5.0, 9.0]]
    """
    n = x.shape[0]
    out = np.empty((n, matrix.shape[0]), dtype=np.float32)
    for start in range(0, n, TILE):
        rows = min(TILE, n - start)
        tile = x[start:start + TILE]
        if rows < TILE:
            tile = np.concatenate([tile, np.zeros((TILE - rows, x.shape[1]), dtype=np.float32)])
        out[start:start + rows] = (matrix @ tile.T)[:, :rows].T
    return out


def use_batch_invariant_matmul(model: Any) -> bool:
    """Swap a CPU model's backend for ``BatchInvariantCpuBackend`` (same weights and cache); False if not on CPU."""
    if type(model.ops) is not CpuBackend:
        return False
    backend = BatchInvariantCpuBackend.__new__(BatchInvariantCpuBackend)
    backend.__dict__.update(vars(model.ops))  # the same settings (activation rounding) as the backend it replaces
    model.ops = model.ctx.ops = backend
    return True
