"""The float32 dot products of attention with an F32 KV cache (flash attention off), in ggml's two orders:

- ``ggml_vec_dot_f32`` (vec.cpp, AVX2): four 8-lane accumulators over steps of 32 (element ``i`` goes to
  accumulator ``(i % 32) // 8``, lane ``i % 8``; ``acc = fma(x, y, acc)``), reduced by ``GGML_F32x8_REDUCE``.
  ggml uses it for every ``kq = k . q`` and, for a single query row (decode), for ``kqv = v . softmax``.
- llamafile's ``tinyBLAS`` F32 kernel: one 8-lane accumulator over steps of 8, reduced by ``hsum8``. ggml uses it
  for ``kqv`` when the batch has two or more query rows (prefill), as the softmax is then a contiguous matrix.

Lengths must be multiples of 32 (resp. 8): pad with zeros, which add nothing to any lane.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from rocmforge.exact.simd import fma32, hsum8, reduce_4x8


@njit(inline="always")
def vec_dot_f32(x: np.ndarray, y: np.ndarray) -> np.float32:
    """``ggml_vec_dot_f32`` of two float32 vectors whose length is a multiple of 32."""
    acc = np.zeros((4, 8), dtype=np.float32)
    for i0 in range(0, x.shape[0], 32):
        for j in range(4):
            for lane in range(8):
                i = i0 + 8 * j + lane
                acc[j, lane] = fma32(x[i], y[i], acc[j, lane])
    return reduce_4x8(acc)


@njit(inline="always")
def tinyblas_dot_f32(x: np.ndarray, y: np.ndarray) -> np.float32:
    """tinyBLAS's float32 dot product of two vectors whose length is a multiple of 8."""
    acc = np.zeros(8, dtype=np.float32)
    for i0 in range(0, x.shape[0], 8):
        for lane in range(8):
            acc[lane] = fma32(x[i0 + lane], y[i0 + lane], acc[lane])
    return hsum8(acc)
