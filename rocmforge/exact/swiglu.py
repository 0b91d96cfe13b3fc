"""ggml's ``ggml_vec_swiglu_f32`` (vec.cpp, AVX2): ``silu(gate) * up`` with ``silu(x) = x / (1 + ggml_v_expf(-x))``
on every full group of 8 values, and libm's ``expf`` (``ggml_silu_f32``) on the last ``n % 8``.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from rocmforge.exact.expf_lanes import swiglu_8


@njit(cache=True)
def _swiglu(gate, up, out):  # pragma: no cover - compiled
    n, d = gate.shape
    vector_end = d - d % 8
    for r in range(n):
        for i in range(0, vector_end, 8):
            swiglu_8(gate[r], up[r], i, out[r])
        for i in range(vector_end, d):
            x = gate[r, i]
            out[r, i] = x / (np.float32(1) + np.float32(math.exp(-x))) * up[r, i]


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``silu(gate) * up`` for float32 ``[n, d_ff]`` arrays, in ggml's arithmetic.

    >>> import numpy as np
    >>> round(float(swiglu(np.ones((1, 8), np.float32), np.full((1, 8), 2, np.float32))[0, 0]), 6)
    1.462117
    """
    gate = np.ascontiguousarray(gate, dtype=np.float32)
    out = np.empty_like(gate)
    _swiglu(gate, np.ascontiguousarray(up, dtype=np.float32), out)
    return out
