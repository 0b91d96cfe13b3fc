"""ggml's ``rms_norm`` (ops.cpp) followed by the ``mul`` with the norm weight (or the fused rms_norm+mul, same
arithmetic): each square is a float32 product, the squares add up one after another in double, the mean
``sum/n`` is rounded to float32, ``scale = 1.0f/sqrtf(mean + eps)`` in float32, and ``y = (x*scale)*w``.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _rms_norm(x, weight, eps, out):  # pragma: no cover - compiled
    n, d = x.shape
    for r in range(n):
        total = 0.0
        for i in range(d):
            total += np.float64(x[r, i] * x[r, i])
        mean = np.float32(total / d)
        scale = np.float32(1) / np.sqrt(mean + eps)
        for i in range(d):
            out[r, i] = (x[r, i] * scale) * weight[i]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Normalize the last axis of float32 ``x`` (``[..., d]``) and scale by ``weight`` ``[d]``, in ggml's order.

    >>> import numpy as np
    >>> rms_norm(np.array([[3.0, 4.0]], np.float32), np.ones(2, np.float32), 0.0).tolist()
    [[0.8485281467437744, 1.1313709020614624]]
    """
    rows = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    _rms_norm(rows, np.ascontiguousarray(weight, dtype=np.float32), np.float32(eps), out)
    return out.reshape(x.shape)
