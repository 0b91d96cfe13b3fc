"""Causal scaled dot-product attention (Vaswani et al., 2017) with grouped-query heads and an optional
sliding window, for ONE sequence whose keys/values for positions ``0..L-1`` have been gathered.

Query head ``h`` reads key/value head ``h // (H / H_kv)`` (llama.cpp's GQA layout). A query at position
``p`` sees keys at positions ``k <= p``, and with a window ``w`` only ``p - k < w`` (llama.cpp's standard SWA).

The three steps are separate functions so the forward can hook the scores and the pattern:
``attention_scores`` -> ``softmax`` (rocmforge.ops.softmax) -> ``attention_mix``; ``attention`` runs them
back to back (the GPU twin is a fused flash-attention kernel).
"""
from __future__ import annotations

import numpy as np

from rocmforge.ops.softmax import softmax


def causal_mask(q_positions: np.ndarray, n_keys: int, window: int | None = None) -> np.ndarray:
    """Boolean ``[t, L]``: True where query ``i`` may read key position ``j``."""
    key_positions = np.arange(n_keys)
    allowed = key_positions[None, :] <= q_positions[:, None]
    if window is not None:
        allowed &= (q_positions[:, None] - key_positions[None, :]) < window
    return allowed


def attention_scores(q: np.ndarray, keys: np.ndarray, q_positions: np.ndarray, scale: float,
                     window: int | None = None, softcap: float | None = None) -> np.ndarray:
    """Masked scores ``[H, t, L]`` = scale * q.k (masked entries are -inf).

    ``q``: ``[t, H, d]``; ``keys``: ``[L, H_kv, d]``; ``q_positions``: ``[t]`` (position of each query).
    """
    t, n_heads, d_head = q.shape
    n_keys, n_kv_heads, _ = keys.shape
    group = n_heads // n_kv_heads
    q_grouped = q.transpose(1, 0, 2).reshape(n_kv_heads, group * t, d_head)
    scores = (q_grouped @ keys.transpose(1, 2, 0)).reshape(n_heads, t, n_keys) * np.float32(scale)
    if softcap is not None:
        scores = np.float32(softcap) * np.tanh(scores / np.float32(softcap))
    if t == 1 and q_positions[0] == n_keys - 1 and (window is None or n_keys <= window):
        return scores  # a decode step: the newest query sees every key, so the mask would change nothing
    return np.where(causal_mask(q_positions, n_keys, window)[None], scores, np.float32(-np.inf))


def attention_mix(pattern: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Weighted sum of values: ``pattern`` ``[H, t, L]``, ``values`` ``[L, H_kv, d]`` -> ``z`` ``[t, H, d]``."""
    n_heads, t, n_keys = pattern.shape
    n_kv_heads, d_head = values.shape[1], values.shape[2]
    group = n_heads // n_kv_heads
    z = pattern.reshape(n_kv_heads, group * t, n_keys) @ values.transpose(1, 0, 2)
    return np.ascontiguousarray(z.reshape(n_heads, t, d_head).transpose(1, 0, 2))


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, q_positions: np.ndarray, scale: float,
              window: int | None = None, softcap: float | None = None) -> np.ndarray:
    """softmax(scale * q k^T + causal mask) v for one sequence: ``[t, H, d]`` queries -> ``[t, H, d]``.

    >>> import numpy as np
    >>> q = np.ones((2, 1, 4), np.float32); k = np.ones((2, 1, 4), np.float32)
    >>> v = np.array([[[1.0] * 4], [[3.0] * 4]], np.float32)
    >>> attention(q, k, v, np.array([0, 1]), scale=0.5)[:, 0, 0].tolist()  # equal scores: mean of visible values
    [1.0, 2.0]
    """
    pattern = softmax(attention_scores(q, keys, q_positions, scale, window, softcap))
    return attention_mix(pattern, values)
