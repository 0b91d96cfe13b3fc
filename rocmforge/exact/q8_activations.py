"""ggml's x86 ``quantize_row_q8_0`` / ``quantize_row_q8_1`` (arch/x86/quants.c, AVX2 branch): how a float32
activation row is rounded to 8-bit blocks of 32 before it meets a Q8_0/Q4_0/Q5_0 (q8_0) or Q4_1/Q5_1 (q8_1)
weight.

Per block: ``amax`` = max |x|; scale ``d = amax / 127`` (float32 division) stored as fp16; the values are
``rint(x * (127 / amax))`` (a float32 multiplier, round half to even as ``_mm256_round_ps``); q8_1 also stores
``s = fp16(d * sum(q))`` with the float32 ``d`` (before its fp16 rounding). Every step is one IEEE float32
operation, so numpy computes the same bits.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from rocmforge.exact.simd import round_fp16
from rocmforge.exact.threads import ELEMENT_WORK, split_rows

BLOCK = 32


class Q8Blocks(NamedTuple):
    """Activations ``[n, k]`` as llama.cpp's 8-bit blocks: ``qs`` int8 ``[n, k/32, 32]``, ``d`` (the fp16 scale,
    as float32) ``[n, k/32]``, ``s`` (q8_1 only: fp16 ``d*sum(qs)`` as float32, else None) ``[n, k/32]``."""

    qs: np.ndarray
    d: np.ndarray
    s: np.ndarray | None


def quantize_q8(x: np.ndarray, with_sum: bool) -> Q8Blocks:
    """Round float32 rows ``x`` ``[n, k]`` (k a multiple of 32) to q8_1 blocks (``with_sum``) or q8_0 blocks.

    >>> import numpy as np
    >>> blocks = quantize_q8(np.linspace(-1, 2, 32, dtype=np.float32)[None], with_sum=True)
    >>> int(blocks.qs[0, 0, -1]), float(blocks.d[0, 0]), int(blocks.qs[0, 0].sum())
    (127, 0.0157470703125, 1017)
    """
    n, k = x.shape
    qs = np.empty((n, k // BLOCK, BLOCK), dtype=np.int8)
    d = np.empty((n, k // BLOCK), dtype=np.float32)
    s = np.empty_like(d)
    args = (np.ascontiguousarray(x, dtype=np.float32).reshape(n, k // BLOCK, BLOCK), qs, d, s)
    split_rows(_quantize_parallel, _quantize, args, n, work=n * k * ELEMENT_WORK)
    return Q8Blocks(qs, d, s if with_sum else None)


@njit(cache=True, nogil=True)
def _quantize(blocks, qs, d, s, start, stop):  # pragma: no cover - compiled
    for r in range(start, stop):
        for b in range(blocks.shape[1]):
            amax = np.float32(0)
            for i in range(BLOCK):
                amax = max(amax, abs(blocks[r, b, i]))
            inverse = np.float32(127) / amax if amax != 0 else np.float32(0)
            total = 0
            for i in range(BLOCK):
                q = np.int8(np.rint(blocks[r, b, i] * inverse))
                qs[r, b, i] = q
                total += q
            scale = amax / np.float32(127)
            d[r, b] = round_fp16(scale)
            s[r, b] = round_fp16(scale * np.float32(total))


@njit(cache=True, parallel=True)
def _quantize_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of rows per thread (threads.split_rows)
        _quantize(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)
