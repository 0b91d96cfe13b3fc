"""LayerNorm (Ba et al., 2016): (x - mean) / sqrt(var + eps) * weight + bias, over the last axis; with
``residual``, of ``x + residual`` (a post-norm encoder's residual add, in the same pass over the rows).

Compiled with numba, rows split over the cores: BERT's encoder runs it twice per layer on every token, and
numpy's five passes over the activations cost as much as a layer's matrix products on two cores.
"""
from __future__ import annotations

import numba
import numpy as np


# reassoc: the row sums may be added in any order, so they run in vector lanes (~3x faster than one by one)
@numba.njit(fastmath={"reassoc", "contract"}, cache=True)
def normalize_row(row: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> None:
    """``row`` (``[d]``) -> (row - mean) / sqrt(var + eps) * weight + bias, in place. ``linear`` runs it too, on
    the rows of its block while they are in cache, so a norm fused there gives the same bits as this op."""
    d = row.shape[0]
    mean = np.float32(0.0)
    for i in range(d):
        mean += row[i]
    mean /= np.float32(d)  # float32 throughout: an int divisor would make the statistics float64 (2.6x slower)
    var = np.float32(0.0)
    for i in range(d):
        diff = row[i] - mean
        var += diff * diff
    inv = np.float32(1.0) / np.sqrt(var / np.float32(d) + np.float32(eps))
    for i in range(d):
        row[i] = (row[i] - mean) * inv * weight[i] + bias[i]


@numba.njit(parallel=True, cache=True)
def _layer_norm_rows(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
                     out: np.ndarray) -> None:
    n, d = x.shape
    with_residual = residual.shape[0] == n
    for r in numba.prange(n):
        row = out[r]
        if with_residual:
            for i in range(d):
                row[i] = x[r, i] + residual[r, i]
        else:
            row[:] = x[r]
        normalize_row(row, weight, bias, eps)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
               residual: np.ndarray | None = None) -> np.ndarray:
    """Normalize the last axis of ``x`` (``[..., d]``, float32), or of ``x + residual`` (same shape), to zero mean
    and unit variance, then scale and shift.

    >>> import numpy as np
    >>> one, zero = np.ones(2, np.float32), np.zeros(2, np.float32)
    >>> layer_norm(np.array([[1.0, 3.0]], np.float32), one, zero, 0.0).tolist()
    [[-1.0, 1.0]]
    >>> layer_norm(np.array([[1.0, 3.0]], np.float32), one, zero, 0.0, residual=np.array([[4.0, 0.0]], np.float32)).tolist()
    [[1.0, -1.0]]
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = x.reshape(-1, x.shape[-1])
    if residual is None:
        extra = np.zeros((0, rows.shape[1]), np.float32)  # no rows: the kernel copies x alone
    else:
        extra = np.ascontiguousarray(residual, dtype=np.float32).reshape(rows.shape)
    out = np.empty_like(rows)
    _layer_norm_rows(rows, extra, np.asarray(weight, np.float32), np.asarray(bias, np.float32), np.float32(eps), out)
    return out.reshape(x.shape)
