"""GELU (Hendrycks & Gimpel, 2016) in its exact form, x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), as BERT uses it.

Compiled with numba (numpy has no erf, and BERT's feed-forward applies it to 1536 values per token per layer):
``math.erf`` on float32 is the C library's ``erff``, the same function the GPU kernel calls.
"""
from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(parallel=True, fastmath=False, cache=True)
def _gelu_flat(x: np.ndarray, out: np.ndarray) -> None:
    inv_sqrt2 = np.float32(1.0 / math.sqrt(2.0))
    for i in numba.prange(x.size):
        v = x[i]
        out[i] = np.float32(0.5) * v * (np.float32(1.0) + math.erf(v * inv_sqrt2))


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU elementwise, float32.

    >>> import numpy as np
    >>> gelu(np.array([-1.0, 0.0, 1.0], np.float32)).round(4).tolist()
    [-0.1587, 0.0, 0.8413]
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _gelu_flat(x.reshape(-1), out.reshape(-1))
    return out
