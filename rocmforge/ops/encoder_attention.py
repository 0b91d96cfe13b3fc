"""Bidirectional self-attention over packed sequences, as an encoder (BERT) uses it: no cache, no causal mask.

Sequences of different lengths sit one after another in ``[n_tokens, heads * d_head]`` rows (no padding; on the
CPU q, k and v may be column blocks of one ``[n_tokens, 3 * heads * d_head]`` projection, read where they lie);
``offsets`` (``[n_seq + 1]``) says where each starts. Every token attends to every token of its own sequence.

On the CPU one numba kernel spreads the (head, sequence) pairs over numba's threads (head-major: threads that get
whole heads get the same work whatever the texts' lengths), each pair as plain loops that LLVM vectorizes, no
BLAS: small sgemms called at once from numba's threads gave wrong mixes once inside OpenBLAS (tests/test_ops.py's
four-thread check, cause not found), and these loops run a pair's small products at ~95 GFLOP/s a core, faster
than SciPy's sgemm did on them (~60). Every sum adds its terms in order, so AVX2 and AVX-512 builds give the same
bits.
- The scores are computed transposed, ``[keys, queries]``, from the pair's queries transposed and scaled
  (``[d_head, queries]``): every loop then runs along a row of queries, so the products, the running max, the
  exponentials and the sums are elementwise across contiguous values, which LLVM vectorizes; a reduction along a
  row would go one value at a time. The mixed values come out transposed too, ``[d_head, queries]``.
- Rows of queries are padded to a multiple of 16 (zeros): the vectorized loops then never end in a scalar tail
  (up to half of a 60-token row otherwise).
- ``_combine_rows`` (both products) makes four output rows per pass, four terms at a time, so each vector load
  of the rows serves four multiply-adds and each output row is loaded and stored once per four.
"""
from __future__ import annotations

import numba
import numpy as np

from rocmforge.ops.cpu_kernels import exp_f32

QUERY_STEP = 16  # query rows padded to a multiple of this (measured: ~5% less CPU than 32 at 202 tokens, 8 no better)


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


# contract: the sums of products as FMAs; the terms are added in order (no reassociation), so any vector width
# gives the same bits
@numba.njit(fastmath={"contract"}, inline="always")
def _combine_rows(coef: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """``out[r] = sum over a of coef[r, a] * rows[a]`` for each ``r < coef.shape[0]``, four output rows per pass and
    four terms at a time (measured best of 1-8 rows x 2-16 terms: ~1.25x two rows x eight terms); ``out`` has
    three spare rows past them (a last pass of fewer rows repeats the last into them)."""
    n_out, n_terms = coef.shape
    width = rows.shape[1]
    whole = n_terms - n_terms % 4
    last = n_out - 1
    for r in range(0, n_out, 4):
        r1, r2, r3 = min(r + 1, last), min(r + 2, last), min(r + 3, last)
        o0, o1, o2, o3 = out[r], out[r + 1], out[r + 2], out[r + 3]
        o0[:] = 0
        o1[:] = 0
        o2[:] = 0
        o3[:] = 0
        for a in range(0, whole, 4):
            x0, x1, x2, x3 = rows[a], rows[a + 1], rows[a + 2], rows[a + 3]
            c00, c01, c02, c03 = coef[r, a], coef[r, a + 1], coef[r, a + 2], coef[r, a + 3]
            c10, c11, c12, c13 = coef[r1, a], coef[r1, a + 1], coef[r1, a + 2], coef[r1, a + 3]
            c20, c21, c22, c23 = coef[r2, a], coef[r2, a + 1], coef[r2, a + 2], coef[r2, a + 3]
            c30, c31, c32, c33 = coef[r3, a], coef[r3, a + 1], coef[r3, a + 2], coef[r3, a + 3]
            for i in range(width):
                y0, y1, y2, y3 = x0[i], x1[i], x2[i], x3[i]
                o0[i] = o0[i] + c00 * y0 + c01 * y1 + c02 * y2 + c03 * y3
                o1[i] = o1[i] + c10 * y0 + c11 * y1 + c12 * y2 + c13 * y3
                o2[i] = o2[i] + c20 * y0 + c21 * y1 + c22 * y2 + c23 * y3
                o3[i] = o3[i] + c30 * y0 + c31 * y1 + c32 * y2 + c33 * y3
        for a in range(whole, n_terms):
            x, c0, c1, c2, c3 = rows[a], coef[r, a], coef[r1, a], coef[r2, a], coef[r3, a]
            for i in range(width):
                o0[i] += c0 * x[i]
                o1[i] += c1 * x[i]
                o2[i] += c2 * x[i]
                o3[i] += c3 * x[i]


@numba.njit(fastmath={"contract"}, cache=True)
def _attend_pair(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: np.float32, out: np.ndarray) -> None:
    """One head of one sequence: ``q``, ``k``, ``v`` and ``out`` are its ``[t, d_head]`` blocks (views)."""
    t, d = q.shape
    padded = (t + QUERY_STEP - 1) // QUERY_STEP * QUERY_STEP
    queries = np.zeros((d, padded), np.float32)  # scale q, transposed
    for i in range(t):
        for c in range(d):
            queries[c, i] = q[i, c] * scale
    scores = np.empty((t + 3, padded), np.float32)  # [keys, queries]
    _combine_rows(k, queries, scores)
    totals = np.empty(padded, np.float32)
    _softmax_columns(scores[:t], totals)
    mixed = np.empty((d + 3, padded), np.float32)  # [d_head, queries] = v^T p
    _combine_rows(v.T, scores[:t], mixed)
    for i in range(t):
        inverse = np.float32(1.0) / totals[i]
        for c in range(d):
            out[i, c] = mixed[c, i] * inverse


@numba.njit(parallel=True, cache=True)
def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, offsets: np.ndarray, n_heads: int, scale: np.float32,
            out: np.ndarray) -> None:
    d = q.shape[1] // n_heads
    n_seq = len(offsets) - 1
    for pair in numba.prange(n_seq * n_heads):  # head-major: each thread's share holds whole heads of every text
        head, seq = pair // n_seq, pair % n_seq
        rows, cols = slice(offsets[seq], offsets[seq + 1]), slice(head * d, head * d + d)
        _attend_pair(q[rows, cols], k[rows, cols], v[rows, cols], scale, out[rows, cols])


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
    if not (q.ndim == 2 and q.shape == k.shape == v.shape):
        raise ValueError(f"encoder_attention: q, k and v must be 2-D of one shape, got {q.shape}, {k.shape}, {v.shape}")
    out = np.empty(q.shape, dtype=np.float32)
    _attend(q, k, v, np.asarray(offsets, np.int64), n_heads, np.float32(scale), out)
    return out
