"""Causal attention of one sequence as ggml computes it with flash attention off and an F32 KV cache
(``build_attn_mha`` in llama-graph.cpp): ``kq = k . q`` per key (``ggml_vec_dot_f32``), ``soft_max_ext`` with
the scale and the causal (and sliding-window) mask, then ``kqv = v . p`` per output feature, by tinyBLAS when the
batch has two or more query rows and by ``ggml_vec_dot_f32`` for one (see ``dot_f32``).

The three steps are separate (``attention_scores`` -> ``attention_softmax`` -> ``attention_mix``) so hooks can
read the scores and the pattern; ``attention`` runs them fused, with the same arithmetic. ``attention_scores``
applies the scale (``kq * scale``, the same float32 product ``soft_max_ext`` forms first) and the softmax then
runs with scale 1. Keys are padded with zeros to a multiple of
32, which changes no sum (ggml's own KV view is padded to 256 cells whose probabilities are exactly 0).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from rocmforge.exact.dot_f32 import tinyblas_dot_f32, vec_dot_f32
from rocmforge.exact.simd import fma32
from rocmforge.exact.soft_max import soft_max, soft_max_row
from rocmforge.exact.threads import split_rows
from rocmforge.ops.attention import causal_mask

_PAD = 32


def _padded(n: int) -> int:
    return -(-n // _PAD) * _PAD


@njit(cache=True)
def _scores(q, keys, group, out):  # pragma: no cover - compiled
    t, n_heads, _ = q.shape
    n_keys = keys.shape[0]
    for h in range(n_heads):
        for i in range(t):
            for j in range(n_keys):
                out[h, i, j] = vec_dot_f32(keys[j, h // group], q[i, h])


@njit(cache=True)
def _mix(pattern, values_t, group, tinyblas, out):  # pragma: no cover - compiled
    n_heads, t, _ = pattern.shape
    d_v = values_t.shape[1]
    for h in range(n_heads):
        for i in range(t):
            for c in range(d_v):
                v = values_t[h // group, c]
                out[i, h, c] = tinyblas_dot_f32(v, pattern[h, i]) if tinyblas else vec_dot_f32(v, pattern[h, i])


@njit(inline="always")
def _mix_row(values, kv, p, n_keys, tinyblas, acc, out):
    # out[c] = v[:, c] . p in ggml's lanes (key j in accumulator lane j % 32, or j % 8 for tinyBLAS), computed for
    # all c at once from values[j, kv, :] (no transposed copy of the values); padded keys add fma(0, 0, acc)
    d_v = values.shape[2]
    n_lanes = 8 if tinyblas else 32
    acc[:n_lanes] = 0
    for j in range(p.shape[0]):
        a, pj = j % n_lanes, p[j]
        if j < n_keys:
            for c in range(d_v):
                acc[a, c] = fma32(values[j, kv, c], pj, acc[a, c])
        else:
            for c in range(d_v):
                acc[a, c] = fma32(np.float32(0), pj, acc[a, c])
    if tinyblas:  # hsum8
        for c in range(d_v):
            out[c] = ((acc[0, c] + acc[4, c]) + (acc[2, c] + acc[6, c])) \
                + ((acc[1, c] + acc[5, c]) + (acc[3, c] + acc[7, c]))
        return
    for i in range(8):  # GGML_F32x8_REDUCE of the four 8-lane accumulators: lane by lane, into row i
        for c in range(d_v):
            acc[i, c] = (acc[i, c] + acc[16 + i, c]) + (acc[8 + i, c] + acc[24 + i, c])
    for c in range(d_v):
        out[c] = ((acc[0, c] + acc[4, c]) + (acc[1, c] + acc[5, c])) \
            + ((acc[2, c] + acc[6, c]) + (acc[3, c] + acc[7, c]))


@njit(cache=True, nogil=True)
def _attention(q, keys, values, allowed, scale, group, tinyblas, out, start, stop):  # pragma: no cover - compiled
    # heads start..stop; the three steps below in one pass per (head, query row): no [H, t, L] temporaries
    t = q.shape[0]
    n_keys = keys.shape[0]
    padded = -(-n_keys // _PAD) * _PAD
    w = np.full(padded, -np.inf, dtype=np.float32)
    p = np.empty(padded, dtype=np.float32)
    lanes = np.empty(8, dtype=np.float32)
    acc = np.empty((32, values.shape[2]), dtype=np.float32)
    for h in range(start, stop):
        kv = h // group
        for i in range(t):
            for j in range(n_keys):
                w[j] = vec_dot_f32(keys[j, kv], q[i, h]) * scale if allowed[i, j] else np.float32(-np.inf)
            soft_max_row(w, lanes, p)  # the padding's -inf gives exactly 0
            _mix_row(values, kv, p, n_keys, tinyblas, acc, out[i, h])


@njit(cache=True, parallel=True)
def _attention_parallel(args, n_heads, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of heads per thread (threads.split_rows)
        _attention(*args, n_heads * i // n_slices, n_heads * (i + 1) // n_slices)


def attention_scores(q: np.ndarray, keys: np.ndarray, q_positions: np.ndarray, scale: float,
                     window: int | None = None) -> np.ndarray:
    """``q`` ``[t, H, d]`` (d a multiple of 32) against ``keys`` ``[L, H_kv, d]`` -> ``kq * scale`` ``[H, t, L]``,
    -inf where the causal/window mask hides a key."""
    t, n_heads, d = q.shape
    n_keys, n_kv_heads, _ = keys.shape
    keys_p = np.zeros((_padded(n_keys), n_kv_heads, d), dtype=np.float32)
    keys_p[:n_keys] = keys
    kq = np.empty((n_heads, t, keys_p.shape[0]), dtype=np.float32)
    _scores(np.ascontiguousarray(q, dtype=np.float32), keys_p, n_heads // n_kv_heads, kq)
    scores = kq[:, :, :n_keys] * np.float32(scale)
    return np.where(causal_mask(np.asarray(q_positions), n_keys, window)[None], scores, np.float32(-np.inf))


def attention_softmax(scores: np.ndarray) -> np.ndarray:
    """ggml's softmax over the last axis of scaled, masked scores ``[..., L]`` (-inf = masked)."""
    n_keys = scores.shape[-1]
    rows = np.full((int(np.prod(scores.shape[:-1])), _padded(n_keys)), -np.inf, dtype=np.float32)
    rows[:, :n_keys] = scores.reshape(-1, n_keys)
    pattern = soft_max(rows, rows > -np.inf, 1.0)
    return np.ascontiguousarray(pattern[:, :n_keys]).reshape(scores.shape)


def attention_mix(pattern: np.ndarray, values: np.ndarray, batch_rows: int) -> np.ndarray:
    """``pattern`` ``[H, t, L]`` times ``values`` ``[L, H_kv, d_v]`` -> ``[t, H, d_v]``; ``batch_rows`` is the number
    of query rows in llama.cpp's batch (two or more: tinyBLAS's order, one: ``ggml_vec_dot_f32``'s)."""
    n_heads, t, n_keys = pattern.shape
    _, n_kv_heads, d_v = values.shape
    padded = _padded(n_keys)
    pattern_p = np.zeros((n_heads, t, padded), dtype=np.float32)
    pattern_p[:, :, :n_keys] = pattern
    values_t = np.zeros((n_kv_heads, d_v, padded), dtype=np.float32)
    values_t[:, :, :n_keys] = values.transpose(1, 2, 0)
    out = np.empty((t, n_heads, d_v), dtype=np.float32)
    _mix(pattern_p, values_t, n_heads // n_kv_heads, batch_rows >= 2, out)
    return out


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, q_positions: np.ndarray, scale: float,
              window: int | None, batch_rows: int) -> np.ndarray:
    """softmax(scale * q k^T + mask) v for one sequence in ggml's arithmetic: ``[t, H, d]`` -> ``[t, H, d_v]``.

    >>> import numpy as np
    >>> q = np.ones((2, 1, 32), np.float32); k = np.ones((2, 1, 32), np.float32)
    >>> v = np.stack([np.full((1, 32), 1.0), np.full((1, 32), 3.0)]).astype(np.float32)
    >>> attention(q, k, v, np.array([0, 1]), 0.5, None, batch_rows=2)[:, 0, 0].tolist()
    [1.0, 2.0]
    """
    t, n_heads, _ = q.shape
    n_keys, n_kv_heads, d_v = values.shape
    out = np.empty((t, n_heads, d_v), dtype=np.float32)
    allowed = causal_mask(np.asarray(q_positions), n_keys, window)
    args = (*(np.ascontiguousarray(a, dtype=np.float32) for a in (q, keys, values)), allowed, np.float32(scale),
            n_heads // n_kv_heads, batch_rows >= 2, out)
    split_rows(_attention_parallel, _attention, args, n_heads, work=t * n_keys * (q.shape[2] + d_v) * n_heads)
    return out
