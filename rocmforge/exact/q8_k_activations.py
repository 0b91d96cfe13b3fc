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
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(n, k // BLOCK, BLOCK)
    first_max = np.abs(blocks).argmax(axis=-1)[..., None]              # argmax keeps the first of equal values
    signed_max = np.take_along_axis(blocks, first_max, axis=-1)[..., 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(signed_max != 0, np.float32(-127) / signed_max, np.float32(0)).astype(np.float32)
        d = np.where(signed_max != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    qs = np.minimum(np.rint(blocks * iscale[..., None]), 127).astype(np.int8)
    bsums = qs.reshape(n, k // BLOCK, 16, 16).sum(axis=-1, dtype=np.int32)
    return Q8KBlocks(qs, d, bsums)
