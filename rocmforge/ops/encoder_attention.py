"""Bidirectional self-attention over packed sequences, as an encoder (BERT) uses it: no cache, no causal mask.

Sequences of different lengths sit one after another in ``[n_tokens, heads * d_head]`` rows (no padding; on the
CPU q, k and v may be column blocks of one ``[n_tokens, 3 * heads * d_head]`` projection, read where they lie);
``offsets`` (``[n_seq + 1]``) says where each starts. Every token attends to every token of its own sequence.

On the CPU one numba kernel runs every (head, sequence) pair, one after another on one thread (see ``_attend``);
each pair is two BLAS products and a softmax between them:
- BLAS (``cpu_kernels.gemm``, one thread per call) reads a head's
  ``[t, d_head]`` block of q, k and v where it lies in the packed rows (leading dimension: their row stride) and
  writes the mixed values straight into the output's columns: no copies per head (they cost as much as the
  products).
- The scores are computed transposed, ``[keys, queries]``, so the softmax over keys runs down the columns: the
  running max, the exponentials and the sums are elementwise over a row of queries, which LLVM vectorizes, where
  a reduction along a row would go one value at a time.
"""
from __future__ import annotations

import numba
import numpy as np

from rocmforge.ops.cpu_kernels import NO_TRANSPOSE, SINGLE, TRANSPOSE, blas_on_numba_threads, element, exp_f32, gemm


@numba.njit(fastmath={"contract"}, cache=True)
def _softmax_columns(s: np.ndarray, totals: np.ndarray) -> None:
    """``s`` ``[keys, queries]`` -> exp(s - each column's max) in place; ``totals`` gets the column sums."""
    peak = s[0].copy()
    for j in range(1, s.shape[0]):
        for i in range(s.shape[1]):
            peak[i] = max(peak[i], s[j, i])
    totals[:] = 0
    for j in range(s.shape[0]):
        for i in range(s.shape[1]):
            e = exp_f32(s[j, i] - peak[i])
            s[j, i] = e
            totals[i] += e


# one thread: the pairs' small sgemms, called at once from numba's threads, gave wrong mixes in a full CI run
# (tests/test_ops.py's four-thread check, 7% of one text's values) with SciPy's BLAS at one thread; the cause was not
# found, and attention is ~16% of the encoder's time
@numba.njit(fastmath=False, cache=True)
def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, ld: int, offsets: np.ndarray, n_heads: int,
            scale: np.float32, out: np.ndarray) -> None:
    width = q.shape[1]
    d = width // n_heads
    n_seq = len(offsets) - 1
    factors = np.array([scale, 1.0, 0.0], np.float32)  # BLAS's alpha and beta, passed by address
    for pair in range(n_seq * n_heads):
        head, start = pair // n_seq, offsets[pair % n_seq]
        t = offsets[pair % n_seq + 1] - start
        first = start * ld + head * d  # the pair's first element in q, k and v (rows `ld` apart)
        # row-major [t, d] at leading dimension `ld` is column-major d x t: BLAS reads the blocks in place.
        # scores, column-major queries x keys = (scale q) k^T, is the row-major [keys, queries] array
        scores = np.empty((t, t), np.float32)
        gemm(SINGLE, TRANSPOSE, NO_TRANSPOSE, t, t, d, element(factors, 0), element(q, first), ld,
             element(k, first), ld, element(factors, 2), element(scores, 0), t)
        totals = np.empty(t, np.float32)
        _softmax_columns(scores, totals)
        # out's block, column-major d x queries at leading dimension `width` = v^T p
        gemm(SINGLE, NO_TRANSPOSE, TRANSPOSE, d, t, t, element(factors, 1), element(v, first), ld,
             element(scores, 0), t, element(factors, 2), element(out, start * width + head * d), width)
        for i in range(t):
            inverse = np.float32(1.0) / totals[i]
            for c in range(head * d, head * d + d):
                out[start + i, c] *= inverse


def encoder_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, offsets: np.ndarray, n_heads: int,
                      scale: float) -> np.ndarray:
    """``softmax(q kᵀ * scale) v`` per sequence and head -> ``[n_tokens, heads * d_head]`` (float32).

    >>> import numpy as np
    >>> x = np.eye(2, dtype=np.float32)
    >>> encoder_attention(x, x, x, np.array([0, 1, 2]), n_heads=1, scale=1.0).tolist()  # two 1-token sequences
    [[1.0, 0.0], [0.0, 1.0]]
    >>> qkv = np.hstack([x, x, x])  # one projection's q|k|v columns, read in place
    >>> encoder_attention(qkv[:, :2], qkv[:, 2:4], qkv[:, 4:], np.array([0, 1, 2]), n_heads=1, scale=1.0).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    q, k, v = (np.asarray(a, dtype=np.float32) for a in (q, k, v))
    row_bytes = q.strides[0]
    # column blocks of one [n, 3 * width] q|k|v product are read in place, rows `row_bytes` apart
    if not (q.ndim == 2 and q.shape == k.shape == v.shape and row_bytes == k.strides[0] == v.strides[0]
            and row_bytes % 4 == 0 and row_bytes >= 4 * q.shape[1] and all(a.strides[1] == 4 for a in (q, k, v))):
        q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))
        row_bytes = q.strides[0]
    out = np.empty(q.shape, dtype=np.float32)
    with blas_on_numba_threads():
        _attend(q, k, v, max(row_bytes // 4, q.shape[1]), np.asarray(offsets, np.int64), n_heads, np.float32(scale),
                out)
    return out
