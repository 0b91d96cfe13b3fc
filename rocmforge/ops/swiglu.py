"""SwiGLU feed-forward gate (Shazeer, 2020): silu(gate) * up, with silu(x) = x * sigmoid(x)."""
from __future__ import annotations

import numpy as np


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``gate * sigmoid(gate) * up`` elementwise; both ``[n, d_ff]``.

    >>> import numpy as np
    >>> swiglu(np.array([0.0, 1.0], np.float32), np.array([5.0, 2.0], np.float32)).astype(float).round(4).tolist()
    [0.0, 1.4621]
    """
    return (gate / (1.0 + np.exp(-gate)) * up).astype(np.float32, copy=False)
