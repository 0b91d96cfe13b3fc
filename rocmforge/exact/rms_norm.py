"""ggml's ``rms_norm`` (ops.cpp) followed by the ``mul`` with the norm weight (or the fused rms_norm+mul, same
arithmetic): each square is a float32 product, the squares add up one after another in double, the mean
``sum/n`` is rounded to float32, ``scale = 1.0f/sqrtf(mean + eps)`` in float32, and ``y = (x*scale)*w``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from rocmforge.exact.threads import ELEMENT_WORK, split_rows


@njit(cache=True, nogil=True)
def _rms_norm(x, weight, eps, out, start, stop):  # pragma: no cover - compiled
    d = x.shape[1]
    for r in range(start, stop):
        total = 0.0
        for i in range(d):
            total += np.float64(x[r, i] * x[r, i])
        mean = np.float32(total / d)
        scale = np.float32(1) / np.sqrt(mean + eps)
        for i in range(d):
            out[r, i] = (x[r, i] * scale) * weight[i]


@njit(cache=True, parallel=True)
def _rms_norm_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of rows per thread (threads.split_rows)
        _rms_norm(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Normalize the last axis of float32 ``x`` (``[..., d]``) and scale by ``weight`` ``[d]``, in ggml's order.

    >>> import numpy as np
    >>> rms_norm(np.array([[3.0, 4.0]], np.float32), np.ones(2, np.float32), 0.0).tolist()
    [[0.8485281467437744, 1.1313709020614624]]
    """
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    args = (rows, np.ascontiguousarray(weight, dtype=np.float32), np.float32(eps), out)
    split_rows(_rms_norm_parallel, _rms_norm, args, rows.shape[0], work=rows.size * ELEMENT_WORK)
    return out.reshape(x.shape)
