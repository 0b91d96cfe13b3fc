"""GELU (Hendrycks & Gimpel, 2016) in its exact form, x * Phi(x) = 0.5 x erfc(-x / sqrt 2), as BERT uses it.

Compiled with numba (numpy has no erf, and BERT's feed-forward applies it to 1536 values per token per layer).
``erfc`` is Numerical Recipes' Chebyshev fit ``erfcc`` (relative error < 1.2e-7 for every argument) on the
vectorizable ``exp_f32``, not the C library's ``erff``: that is a call per element, which LLVM cannot vectorize,
and cost ~10x more. The GPU kernel calls ``erff``; the two agree to float32 rounding (tests/test_gpu_kernels.py).
Through ``erfc`` the negative tail keeps its relative accuracy, which ``1 + erf`` loses to cancellation.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from rocmforge.ops.vector_exp import exp_f32


@numba.njit(inline="always", fastmath=False)
def _gelu_one(v: np.float32) -> np.float32:
    u = v * np.float32(-1.0 / math.sqrt(2.0))  # Phi(v) = erfc(u) / 2
    z = abs(u)
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.5) * z)
    poly = np.float32(0.17087277)  # Horner, written out: LLVM vectorizes straight-line code
    poly = poly * t + np.float32(-0.82215223)
    poly = poly * t + np.float32(1.48851587)
    poly = poly * t + np.float32(-1.13520398)
    poly = poly * t + np.float32(0.27886807)
    poly = poly * t + np.float32(-0.18628806)
    poly = poly * t + np.float32(0.09678418)
    poly = poly * t + np.float32(0.37409196)
    poly = poly * t + np.float32(1.00002368)
    erfc_z = t * exp_f32(-z * z - np.float32(1.26551223) + t * poly)
    erfc_u = erfc_z if u >= np.float32(0.0) else np.float32(2.0) - erfc_z
    return np.float32(0.5) * v * erfc_u


# contract: multiply-adds as FMAs (fewer instructions and roundings; ~1.6x faster)
@numba.njit(parallel=True, fastmath={"contract"}, cache=True)
def _gelu_rows(x: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
    n, d = x.shape
    for r in numba.prange(n):
        for i in range(d):
            out[r, i] = _gelu_one(x[r, i] + bias[i])


def gelu(x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Exact (erf) GELU elementwise, float32; with ``bias`` (``[d]``, over the last axis) of ``x + bias``, in the
    same pass (a feed-forward layer's up-projection bias).

    >>> import numpy as np
    >>> gelu(np.array([-1.0, 0.0, 1.0], np.float32)).astype(float).round(4).tolist()
    [-0.1587, 0.0, 0.8413]
    >>> gelu(np.array([[-1.0, 0.0]], np.float32), bias=np.array([2.0, 1.0], np.float32)).astype(float).round(4).tolist()
    [[0.8413, 0.8413]]
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    shift = np.zeros(rows.shape[1], np.float32) if bias is None else np.asarray(bias, np.float32)
    out = np.empty_like(rows)
    _gelu_rows(rows, shift, out)
    return out.reshape(x.shape)
