"""GeGLU feed-forward gate (Shazeer, 2020) with the tanh approximation of GELU, as Gemma uses."""
from __future__ import annotations

import numpy as np

_SQRT_2_OVER_PI = np.float32(np.sqrt(2.0 / np.pi))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + np.float32(0.044715) * x * x * x)))


def geglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``gelu_tanh(gate) * up`` elementwise; both ``[n, d_ff]``.

    >>> import numpy as np
    >>> geglu(np.array([0.0, 1.0], np.float32), np.array([5.0, 2.0], np.float32)).astype(float).round(4).tolist()
    [0.0, 1.6824]
    """
    return (gelu_tanh(gate) * up).astype(np.float32, copy=False)
