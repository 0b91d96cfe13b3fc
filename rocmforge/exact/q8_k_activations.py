"""ggml's ``quantize_row_q8_K`` (``quantize_row_q8_K_ref``, ggml-quants.c; the x86 build calls the reference, and
the repacked Q4_K path's ``ggml_quantize_mat_q8_K_4x8`` gives the same values): how a float32 activation row is
rounded to 8-bit blocks of 256 before it meets a K-quant weight (Q4_K, Q6_K).

Per block: ``max`` = the first element of largest magnitude (with its sign), ``iscale = -127/max``, values
``nearest_int(iscale * x)`` (a float32 product rounded half to even: ggml-base is built without FMA, so no fused
add sneaks into the magic-number rounding), ``d = 1/iscale`` kept as float32, and ``bsums`` = the integer sum of
each 16 values. Every step is one IEEE float32 operation, so numpy computes the same bits.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from rocmforge.exact.threads import ELEMENT_WORK, split_rows

BLOCK = 256


class Q8KBlocks(NamedTuple):
    """Activations ``[n, k]`` as llama.cpp's Q8_K blocks: ``qs`` int8 ``[n, k/256, 256]``, ``d`` float32
    ``[n, k/256]``, ``bsums`` int32 ``[n, k/256, 16]`` (sums of 16 consecutive ``qs``)."""

    qs: np.ndarray
    d: np.ndarray
    bsums: np.ndarray


def quantize_q8_k(x: np.ndarray) -> Q8KBlocks:
    """Round float32 rows ``x`` ``[n, k]`` (k a multiple of 256) to Q8_K blocks.

    >>> import numpy as np
    >>> blocks = quantize_q8_k(np.linspace(-2, 1, 256, dtype=np.float32)[None])
    >>> int(blocks.qs[0, 0, 0]), float(blocks.d[0, 0]), int(blocks.bsums[0, 0, 0])
    (-127, 0.015748031437397003, -1944)
    """
    n, k = x.shape
    qs = np.empty((n, k // BLOCK, BLOCK), dtype=np.int8)
    d = np.empty((n, k // BLOCK), dtype=np.float32)
    bsums = np.empty((n, k // BLOCK, 16), dtype=np.int32)
    args = (np.ascontiguousarray(x, dtype=np.float32).reshape(n, k // BLOCK, BLOCK), qs, d, bsums)
    split_rows(_quantize_parallel, _quantize, args, n, work=n * k * ELEMENT_WORK)
    return Q8KBlocks(qs, d, bsums)


@njit(cache=True, nogil=True)
def _quantize(blocks, qs, d, bsums, start, stop):  # pragma: no cover - compiled
    for r in range(start, stop):
        for b in range(blocks.shape[1]):
            # the largest magnitude as the bits of |x| (an integer max: vectorized, where a float one with
            # ggml's "first of equal magnitudes" would run element by element), then the first element that has it
            bits = blocks[r, b].view(np.int32)
            amax_bits = np.int32(0)
            for i in range(BLOCK):
                magnitude = bits[i] & 0x7FFFFFFF
                amax_bits = max(amax_bits, magnitude if magnitude <= 0x7F800000 else 0)  # a NaN never wins
            signed_max = np.float32(0)
            for i in range(BLOCK):
                if bits[i] & 0x7FFFFFFF == amax_bits:
                    signed_max = blocks[r, b, i]
                    break
            iscale = np.float32(-127) / signed_max if signed_max != 0 else np.float32(0)
            d[r, b] = np.float32(1) / iscale if signed_max != 0 else np.float32(0)
            x, q = blocks[r, b], qs[r, b]
            for i in range(BLOCK):
                q[i] = np.int8(min(np.rint(x[i] * iscale), np.float32(127)))
            for group in range(16):
                total = np.int32(0)
                for i in range(16 * group, 16 * group + 16):
                    total += np.int32(q[i])
                bsums[r, b, group] = total


@njit(cache=True, parallel=True)
def _quantize_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of rows per thread (threads.split_rows)
        _quantize(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)
