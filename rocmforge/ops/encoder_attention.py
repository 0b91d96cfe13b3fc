"""Bidirectional self-attention over packed sequences, as an encoder (BERT) uses it: no cache, no causal mask.

Sequences of different lengths sit one after another in ``[n_tokens, heads * d_head]`` rows (no padding);
``offsets`` (``[n_seq + 1]``) says where each starts. Every token attends to every token of its own sequence.
"""
from __future__ import annotations

import numpy as np
from threadpoolctl import ThreadpoolController

from rocmforge.ops.softmax import softmax

_BLAS = ThreadpoolController()


def encoder_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, offsets: np.ndarray, n_heads: int,
                      scale: float) -> np.ndarray:
    """``softmax(q kᵀ * scale) v`` per sequence and head -> ``[n_tokens, heads * d_head]`` (float32).

    >>> import numpy as np
    >>> x = np.eye(2, dtype=np.float32)
    >>> encoder_attention(x, x, x, np.array([0, 1, 2]), n_heads=1, scale=1.0).tolist()  # two 1-token sequences
    [[1.0, 0.0], [0.0, 1.0]]
    """
    n, width = q.shape
    d_head = width // n_heads
    out = np.empty((n, width), dtype=np.float32)
    # one BLAS thread: these products are small (t x d_head x t), and a second thread's hand-off costs more
    # than it saves (10x more on a busy machine, where the other thread waits for a core)
    with _BLAS.limit(limits=1, user_api="blas"):
        for start, end in zip(offsets[:-1], offsets[1:]):
            _one_sequence(q, k, v, out, int(start), int(end), n_heads, d_head, scale)
    return out


def _one_sequence(q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, start: int, end: int, n_heads: int,
                  d_head: int, scale: float) -> None:
    t = end - start
    heads = [x[start:end].reshape(t, n_heads, d_head).transpose(1, 0, 2) for x in (q, k, v)]
    qh, kh, vh = (np.ascontiguousarray(h) for h in heads)  # batched matmul on strided views is ~20x slower
    pattern = softmax(qh @ kh.transpose(0, 2, 1) * np.float32(scale))
    out[start:end] = (pattern @ vh).transpose(1, 0, 2).reshape(t, n_heads * d_head)
