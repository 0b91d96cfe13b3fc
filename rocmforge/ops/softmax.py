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
    e = x - row_max
    np.exp(e, out=e)
    total = np.add.reduce(e, axis=-1, keepdims=True)
    # a finite row max contributes exp(0) = 1, so a total is either >= 1 or 0 (a row of -inf): max(total, 1)
    # only replaces the 0, which would divide 0 by 0
    e /= np.maximum(total, 1.0)
    return e.astype(np.float32, copy=False)
