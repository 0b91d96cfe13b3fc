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

from rocmforge.exact.attention_lanes import kq_32, kqv_lane, kqv_lane_wide
from rocmforge.exact.dot_f32 import tinyblas_dot_f32, vec_dot_f32
from rocmforge.exact.expf_lanes import exp_8
from rocmforge.exact.simd import fma32
from rocmforge.exact.soft_max import soft_max
from rocmforge.exact.threads import split_rows
from rocmforge.ops.attention import causal_mask

_PAD = 32
_MANY_ROWS = 8  # from this many query rows the keys and values are re-laid for the lane kernels


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
def _mix_row(values, kv, p, j_start, j_stop, tinyblas, acc, out):
    # out[c] = v[:, c] . p in ggml's lanes (key j in accumulator lane j % 32, or j % 8 for tinyBLAS), computed for
    # all c at once from values[j, kv, :] (no transposed copy of the values); keys outside j_start..j_stop have
    # p = 0, and fma(v, 0, acc) is acc: they are skipped
    d_v = values.shape[2]
    n_lanes = 8 if tinyblas else 32
    acc[:n_lanes] = 0
    for j in range(j_start, j_stop):
        a, pj = j % n_lanes, p[j]
        for c in range(d_v):
            acc[a, c] = fma32(values[j, kv, c], pj, acc[a, c])
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
def _attention(q, keys, key_tiles, values, value_lanes, first, last, scale, group, tinyblas, out, start,
               stop):  # pragma: no cover - compiled
    # query rows start..stop, in the order 0, t-1, 1, t-2, ... so that equal slices of rows get equal causal work;
    # the three steps in one pass per row and head, only over the keys the row may read (first[i]..last[i]): a
    # masked key's probability is exactly 0 and adds nothing anywhere. Every head of a row takes a block of keys
    # (or values) in turn while it is in L1 (heads that share a KV head read the same block).
    # key_tiles / value_lanes (prefill; empty for a few rows) are the cache re-laid for the lane kernels
    t, n_heads, d = q.shape
    d_v = values.shape[2]
    padded = -(-keys.shape[0] // _PAD) * _PAD
    q_flat, tiles_flat, lanes_flat = q.reshape(-1), key_tiles.reshape(-1), value_lanes.reshape(-1)
    kq = np.empty((n_heads, padded), dtype=np.float32)
    w = np.empty(padded, dtype=np.float32)
    p = np.empty((n_heads, padded), dtype=np.float32)
    kq_flat = kq.reshape(-1)
    key_lanes = np.empty(n_heads * 8 * d_v, dtype=np.float32)
    acc = np.empty((32, d_v), dtype=np.float32)
    for m in range(start, stop):
        i = m // 2 if m % 2 == 0 else t - 1 - m // 2
        lo, hi = first[i], last[i]
        b0, b1 = lo // 32 * 32, -(-hi // 32) * 32  # whole blocks of 32 keys (padded is a multiple of 32)
        if key_tiles.size:
            for j0 in range(b0, b1, 32):
                for h in range(n_heads):
                    kq_32(tiles_flat, ((h // group) * padded + j0) * d, 32, q_flat, (i * n_heads + h) * d, d,
                          kq_flat, h * padded + j0)
        else:
            for h in range(n_heads):
                for j in range(lo, hi):
                    kq[h, j] = vec_dot_f32(keys[j, h // group], q[i, h])
        for h in range(n_heads):
            row_max = np.float32(-np.inf)
            for j in range(b0, b1):
                w[j] = kq[h, j] * scale if lo <= j < hi else np.float32(-np.inf)
                row_max = max(row_max, w[j])
            total = 0.0  # ggml_vec_soft_max_f32: hsum8 of each 8 exps added to a double
            ph = p[h]
            for j0 in range(b0, b1, 8):
                total += np.float64(exp_8(w, j0, row_max, ph))
            inverse = np.float32(1.0 / total)
            for j in range(b0, b1):
                ph[j] *= inverse
            if not value_lanes.size:
                _mix_row(values, h // group, ph, lo, hi, tinyblas, acc, out[i, h])
        if not value_lanes.size:
            continue
        for lane in range(8):  # tinyBLAS: key j in lane j % 8
            j = lo + (lane - lo) % 8
            count = max(0, -(-(hi - j) // 8))
            for h in range(n_heads):
                start_v = (((h // group) * 8 + lane) * (padded // 8) + j // 8) * d_v
                if d_v % 128 == 0:
                    kqv_lane_wide(lanes_flat, start_v, d_v, p[h], j, count, d_v, key_lanes, (h * 8 + lane) * d_v)
                else:
                    kqv_lane(lanes_flat, start_v, d_v, p[h], j, count, d_v, key_lanes, (h * 8 + lane) * d_v)
        for h in range(n_heads):
            a = key_lanes[h * 8 * d_v:(h + 1) * 8 * d_v].reshape(8, d_v)
            for c in range(d_v):  # hsum8 of the 8 lanes
                out[i, h, c] = ((a[0, c] + a[4, c]) + (a[2, c] + a[6, c])) + ((a[1, c] + a[5, c]) + (a[3, c] + a[7, c]))


@njit(cache=True, parallel=True)
def _attention_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of query rows per thread (threads.split_rows)
        _attention(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)


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
    t, n_heads, d = q.shape
    n_keys, n_kv_heads, d_v = values.shape
    out = np.empty((t, n_heads, d_v), dtype=np.float32)
    # causal_mask's keys of query i, as a range: positions first[i] .. last[i] - 1
    positions = np.asarray(q_positions, dtype=np.int64)
    last = np.minimum(positions + 1, n_keys)
    first = np.zeros_like(last) if window is None else np.maximum(positions - window + 1, 0)
    padded = _padded(n_keys)
    key_tiles = value_lanes = np.empty((0, 0, 0, 0), dtype=np.float32)  # unused (few rows)
    if t >= _MANY_ROWS:  # [kv head, block of 32 keys, element, key]: kq_32 reads a block front to back
        keys_p = np.zeros((padded, n_kv_heads, d), dtype=np.float32)
        keys_p[:n_keys] = keys
        key_tiles = np.ascontiguousarray(keys_p.reshape(padded // 32, 32, n_kv_heads, d).transpose(2, 0, 3, 1))
        if batch_rows >= 2 and d_v % 64 == 0:  # [kv head, lane, key // 8, feature]: each lane's keys in a row
            values_p = np.zeros((padded, n_kv_heads, d_v), dtype=np.float32)
            values_p[:n_keys] = values
            value_lanes = np.ascontiguousarray(values_p.reshape(padded // 8, 8, n_kv_heads, d_v).transpose(2, 1, 0, 3))
    args = (np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(keys, dtype=np.float32), key_tiles,
            np.ascontiguousarray(values, dtype=np.float32), value_lanes, first, last, np.float32(scale),
            n_heads // n_kv_heads, batch_rows >= 2, out)
    split_rows(_attention_parallel, _attention, args, t, work=t * n_keys * (d + d_v) * n_heads)
    return out
