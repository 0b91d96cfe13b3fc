"""Numerically stable softmax over the last axis (rows that are all -inf give zeros, not NaN)."""
from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray) -> np.ndarray:
    """exp(x - max) / sum over the last axis of ``x`` (``[..., n]``).

    >>> import numpy as np
    >>> softmax(np.array([0.0, np.log(3.0)], np.float32)).astype(float).round(4).tolist()
    [0.25, 0.75]
    """
    # ufunc reductions directly (what np.max / np.sum call): attention runs this once per layer per token
    row_max = np.maximum.reduce(x, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.exp(x - row_max)
    total = np.add.reduce(e, axis=-1, keepdims=True)
    return (e / np.where(total > 0, total, 1.0)).astype(np.float32, copy=False)
