"""GELU (Hendrycks & Gimpel, 2016) in its exact form, x * Phi(x) = 0.5 x erfc(-x / sqrt 2), as BERT uses it.

Compiled with numba (numpy has no erf, and BERT's feed-forward applies it to 1536 values per token per layer):
``cpu_kernels.gelu_f32``, vectorized (Numerical Recipes' erfc on a vectorizable exp, not the C library's ``erff``,
which is a call per element and cost ~10x more). The GPU kernel calls ``erff``; the two agree to float32 rounding
(tests/test_gpu_kernels.py).
"""
from __future__ import annotations

import numba
import numpy as np

from rocmforge.ops.cpu_kernels import gelu_f32


# contract: multiply-adds as FMAs (fewer instructions and roundings; ~1.6x faster)
@numba.njit(parallel=True, fastmath={"contract"}, cache=True)
def _gelu_flat(x: np.ndarray, out: np.ndarray) -> None:
    for i in numba.prange(x.size):
        out[i] = gelu_f32(x[i])


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU elementwise, float32.

    >>> import numpy as np
    >>> gelu(np.array([-1.0, 0.0, 1.0], np.float32)).astype(float).round(4).tolist()
    [-0.1587, 0.0, 0.8413]
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _gelu_flat(x.reshape(-1), out.reshape(-1))
    return out
