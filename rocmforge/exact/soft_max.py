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


@njit(inline="always")
def soft_max_row(w: np.ndarray, lanes: np.ndarray, out: np.ndarray) -> None:
    """``out`` = ggml's softmax of one row ``w`` already scaled and masked (-inf); ``lanes`` is 8 floats of
    scratch."""
    n = w.shape[0]
    vector_end = n - n % 8
    row_max = np.float32(-np.inf)
    for j in range(n):
        row_max = max(row_max, w[j])
    total = 0.0
    for j0 in range(0, vector_end, 8):
        for lane in range(8):
            e = v_expf(w[j0 + lane] - row_max)
            out[j0 + lane] = e
            lanes[lane] = e
        total += np.float64(hsum8(lanes))
    for j in range(vector_end, n):
        e = np.float32(math.exp(w[j] - row_max))
        out[j] = e
        total += np.float64(e)
    inverse = np.float32(1.0 / total)
    for j in range(n):
        out[j] *= inverse


@njit(cache=True)
def _soft_max(scores, allowed, scale, out):  # pragma: no cover - compiled
    n_rows, n = scores.shape
    w = np.empty(n, dtype=np.float32)
    lanes = np.empty(8, dtype=np.float32)
    for r in range(n_rows):
        for j in range(n):
            w[j] = scores[r, j] * scale if allowed[r, j] else np.float32(-np.inf)
        soft_max_row(w, lanes, out[r])


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
