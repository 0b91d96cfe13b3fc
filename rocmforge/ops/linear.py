"""Linear layer: ``x @ weight.T + bias``, an encoder's biased projection (weight ``[out, in]`` as GGUF stores it),
optionally followed by the exact GELU (a feed-forward's up-projection) or by a post-norm encoder's residual add and
LayerNorm (``norm``: the projections back into the residual stream).

A GPU backend runs it as the ``matmul`` kernel, then ``add`` (the bias broadcast over the rows) and ``gelu``. On the
CPU it is one numba kernel: blocks of rows spread over numba's threads, each block's output rows first filled with
the bias, then BLAS's gemm adding the product into them (beta = 1), then the GELU over the block while it is still
in the core's cache, or the residual add and ``layer_norm.normalize_row`` over its rows. The bias, the GELU and
the norm cost no pass over memory (nor a new array) of their own, and BLAS's own thread pool stays idle
(``cpu_kernels`` says why that matters).
"""
from __future__ import annotations

import numba
import numpy as np

from rocmforge.ops.cpu_kernels import (NO_TRANSPOSE, SINGLE, TRANSPOSE, blas_on_numba_threads, element, gelu_f32,
                                      gemm)
from rocmforge.ops.layer_norm import normalize_row

# the most rows per block: BLAS packs the whole weight again for every call, so larger blocks pay that less often
# (512 vs 256: ~3% less CPU for MiniLM); the blocks come in a whole number per thread, of equal size, since
# numba's OpenMP pool hands each thread an equal run of blocks
MAX_BLOCK_ROWS = 512


# contract: the GELU's multiply-adds as FMAs (~1.6x faster)
@numba.njit(parallel=True, fastmath={"contract"}, cache=True)
def _linear_blocks(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, then_gelu: bool, residual: np.ndarray,
                   norm_weight: np.ndarray, norm_bias: np.ndarray, eps: float, block_rows: int,
                   out: np.ndarray) -> None:
    n, k = x.shape
    then_norm = residual.shape[0] == n
    m = weight.shape[0]
    ones = np.ones(1, np.float32)  # BLAS's alpha and beta, passed by address
    for block in numba.prange((n + block_rows - 1) // block_rows):
        first = block * block_rows
        rows = min(block_rows, n - first)
        for r in range(first, first + rows):
            out[r] = bias
        # row-major out[first:first+rows] is column-major m x rows = weight (column-major k x m, transposed) times
        # x's block (column-major k x rows), added to the bias already there
        gemm(SINGLE, TRANSPOSE, NO_TRANSPOSE, m, rows, k, element(ones, 0), element(weight, 0), k,
             element(x, first * k), k, element(ones, 0), element(out, first * m), m)
        if then_gelu:
            for r in range(first, first + rows):
                for i in range(m):
                    out[r, i] = gelu_f32(out[r, i])
        if then_norm:
            for r in range(first, first + rows):
                row = out[r]
                for i in range(m):
                    row[i] += residual[r, i]
                normalize_row(row, norm_weight, norm_bias, eps)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, gelu: bool = False,
           norm: tuple[np.ndarray, np.ndarray, np.ndarray, float] | None = None) -> np.ndarray:
    """``[n, in] x [out, in] + [out] -> [n, out]`` in float32; ``gelu``: then the exact GELU of each value;
    ``norm=(residual, weight, bias, eps)``: then ``layer_norm(out, weight, bias, eps, residual=residual)``.

    >>> import numpy as np
    >>> linear(np.ones((1, 2), np.float32), np.array([[1, 2], [3, 4]], np.float32), np.array([10, 20], np.float32)).tolist()
    [[13.0, 27.0]]
    >>> linear(np.ones((1, 1), np.float32), np.ones((1, 1), np.float32), np.zeros(1, np.float32), gelu=True).astype(float).round(4).tolist()
    [[0.8413]]
    >>> one, zero = np.ones(2, np.float32), np.zeros(2, np.float32)
    >>> linear(np.ones((1, 1), np.float32), np.ones((2, 1), np.float32), zero, norm=(np.array([[2.0, 0.0]], np.float32), one, zero, 0.0)).tolist()
    [[1.0, -1.0]]
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = x.reshape(-1, x.shape[-1])
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    out = np.empty((rows.shape[0], weight.shape[0]), dtype=np.float32)
    if norm is None:  # no rows: the kernel adds and normalizes nothing
        residual, norm_weight, norm_bias, eps = np.zeros((0, out.shape[1]), np.float32), bias, bias, 0.0
    else:
        residual, norm_weight, norm_bias, eps = norm
        residual = np.ascontiguousarray(residual, dtype=np.float32).reshape(out.shape)
    threads = numba.get_num_threads()
    per_thread = max(1, -(-rows.shape[0] // (threads * MAX_BLOCK_ROWS)))
    block_rows = -(-rows.shape[0] // (threads * per_thread * 16)) * 16  # a multiple of BLAS's column unrolling
    with blas_on_numba_threads():
        _linear_blocks(rows, weight, np.asarray(bias, np.float32), gelu, residual, np.asarray(norm_weight, np.float32),
                       np.asarray(norm_bias, np.float32), np.float32(eps), max(block_rows, 16), out)
    return out.reshape(*x.shape[:-1], weight.shape[0])
