"""ggml's ``soft_max_ext`` for attention scores (ops.cpp + ``ggml_vec_soft_max_f32`` in vec.cpp, AVX2):
``w = kq * scale`` then ``+ mask`` (0 or -inf), ``max``, then per group of 8 ``e = ggml_v_expf(w - max)`` whose
horizontal sum (``hsum8``) is added to a double; the row is multiplied by ``(float)(1.0 / sum)``.

The row must be laid out as ggml lays it: key ``j`` at index ``j`` of a row whose length is a multiple of 8
(ggml's KV view is padded to 256 cells; masked cells give exactly 0 and add nothing).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from rocmforge.exact.simd import hsum8, v_expf


@njit(cache=True)
def _soft_max(scores, allowed, scale, out):  # pragma: no cover - compiled
    n_rows, n = scores.shape
    vector_end = n - n % 8
    for r in range(n_rows):
        w = np.empty(n, dtype=np.float32)
        row_max = np.float32(-np.inf)
        for j in range(n):
            w[j] = scores[r, j] * scale if allowed[r, j] else np.float32(-np.inf)
            row_max = max(row_max, w[j])
        lanes = np.empty(8, dtype=np.float32)
        total = 0.0
        for j0 in range(0, vector_end, 8):
            for lane in range(8):
                e = v_expf(w[j0 + lane] - row_max)
                out[r, j0 + lane] = e
                lanes[lane] = e
            total += np.float64(hsum8(lanes))
        for j in range(vector_end, n):
            e = np.float32(math.exp(w[j] - row_max))
            out[r, j] = e
            total += np.float64(e)
        inverse = np.float32(1.0 / total)
        for j in range(n):
            out[r, j] *= inverse


def soft_max(scores: np.ndarray, allowed: np.ndarray, scale: float) -> np.ndarray:
    """Masked, scaled softmax of float32 ``scores`` ``[rows, n_keys]`` (``allowed`` bool, same shape).

    >>> import numpy as np
    >>> soft_max(np.zeros((1, 8), np.float32), np.arange(8)[None] < 2, 1.0)[0, :3].tolist()
    [0.5, 0.5, 0.0]
    """
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    out = np.empty_like(scores)
    _soft_max(scores, np.ascontiguousarray(allowed), np.float32(scale), out)
    return out
