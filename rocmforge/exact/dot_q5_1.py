"""``x @ W.T`` for a Q5_1 weight as ggml's AVX2 ``ggml_vec_dot_q5_1_q8_1`` computes it (no tinyBLAS or repack path
for Q5_1 on x86: every row count takes it).

Per block ggml forms the unsigned 5-bit bytes ``q | h<<4``, multiplies them with the q8_1 activation bytes into 8
int32 lanes (lane ``l`` owns elements ``4l..4l+3``), ``acc[l] = fma(lane, d_w*d_x, acc[l])``; the minimums add
up in a float32 ``summs += m * s`` (fp16 times fp16: exact in float32, so fused or not gives the same bits); the
result is ``hsum8(acc) + summs``. The lanes are the Q8_0 kernel's with offset 0 (``dot_q8_0.matmul_lanes``).

A Q5_1 block (24 bytes) is fp16 ``d`` and ``m``, a 32-bit mask ``qh`` of fifth bits and 16 bytes of nibbles
(element ``i < 16`` the low nibble of byte ``i``, ``16 + i`` its high nibble); the weight is ``d*q + m``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from rocmforge.exact.dot_q8_0 import matmul_lanes
from rocmforge.exact.lanes import LaneWeight
from rocmforge.exact.q8_activations import Q8Blocks, quantize_q8

BLOCK_BYTES = 24


class Q5_1Weight(NamedTuple):
    lanes: LaneWeight  # the 5-bit values (offset 0) and ``d``
    m: np.ndarray      # float32 block minimums ``[out, nb]``


def split_q5_1(raw: np.ndarray) -> Q5_1Weight:
    """Raw Q5_1 rows ``[out, bytes]`` -> ``Q5_1Weight``.

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import dequantize, quantize
    >>> raw = quantize(np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64), T.Q5_1)
    >>> (q, d, _), m = split_q5_1(raw)
    >>> values = d[..., None] * q.reshape(2, 2, 32) + m[..., None]
    >>> bool(np.array_equal(values.reshape(2, 64), dequantize(raw, T.Q5_1)))
    True
    """
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, BLOCK_BYTES)
    scales = np.ascontiguousarray(blocks[..., :4]).view(np.float16).astype(np.float32)
    high = np.ascontiguousarray(blocks[..., 4:8]).view(np.uint32)            # [out, nb, 1]
    fifth = ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # [out, nb, 32]
    nibbles = blocks[..., 8:]
    low = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).astype(np.uint8)
    q = (low | (fifth << 4)).reshape(raw.shape[0], -1)
    return Q5_1Weight(LaneWeight(q, np.ascontiguousarray(scales[..., 0]), 0), np.ascontiguousarray(scales[..., 1]))


def matmul_q5_1(x: np.ndarray | Q8Blocks, weight: Q5_1Weight) -> np.ndarray:
    """float32 ``x`` ``[n, k]`` (or its q8_1 blocks) times a Q5_1 weight (``split_q5_1``): ``[n, out]``.

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import dequantize, quantize
    >>> raw = quantize(np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64), T.Q5_1)
    >>> x = np.linspace(-1, 1, 64, dtype=np.float32)[None]
    >>> bool(np.allclose(matmul_q5_1(x, split_q5_1(raw)), x @ dequantize(raw, T.Q5_1).T, atol=0.02))
    True
    """
    blocks = x if isinstance(x, Q8Blocks) else quantize_q8(x, with_sum=True)
    out = matmul_lanes(blocks, weight.lanes)
    summs = np.zeros_like(out)
    for b in range(weight.m.shape[1]):  # m * s is exact in float32: each step rounds once, as ggml's fma
        summs += weight.m[None, :, b] * blocks.s[:, b, None]
    return out + summs
