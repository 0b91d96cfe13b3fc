"""Logit soft-capping (Gemma 2 style): cap * tanh(x / cap) squashes values smoothly into (-cap, cap)."""
from __future__ import annotations

import numpy as np


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """``cap * tanh(x / cap)`` elementwise.

    >>> import numpy as np
    >>> softcap(np.array([0.0, 1000.0], np.float32), 30.0).tolist()
    [0.0, 30.0]
    """
    return (np.float32(cap) * np.tanh(x / np.float32(cap))).astype(np.float32, copy=False)
