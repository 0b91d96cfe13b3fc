"""Q3_K weights for ``k_quant_lanes``: ``ggml_vec_dot_q3_K_q8_K`` (AVX2) below 8 activation rows, the tiled kernel
from 8 on (no x86 repack for Q3_K).

A Q3_K super-block of 256 weights (110 bytes) is ``hmask[32]`` (third bits), ``qs[64]`` (low 2 bits), 12 bytes of
6-bit scales (one per 16 weights, stored + 32) and fp16 ``d``; weight ``d * scale * v`` with ``v`` in [-4, 4):
``v = low - 4`` unless the high bit is set. Half ``j`` of 128 weights: bits ``2g..2g+1`` of ``qs[32j:32j+32]``
and bit ``4j + g`` of ``hmask`` are weights ``128j + 32g ..``. Codes are stored as ``v + 4`` (the lanes take
the 4 back).
"""
from __future__ import annotations

import numpy as np

from rocmforge.exact.k_quant_lanes import NO_MINS, KQuantWeight

BLOCK_BYTES = 110


def split_q3_k(raw: np.ndarray) -> KQuantWeight:
    """Raw Q3_K rows ``[out, bytes]`` -> ``KQuantWeight`` (codes ``v + 4``, bias 4, no mins).

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import dequantize
    >>> raw = np.random.default_rng(0).integers(0, 256, (2, BLOCK_BYTES), dtype=np.uint8)
    >>> raw[:, 108:] = np.array([0.01], np.float16).view(np.uint8)
    >>> w = split_q3_k(raw)
    >>> values = w.d[..., None] * w.scales.repeat(16, -1) * (w.q.reshape(2, 1, 256) - 4.0)
    >>> bool(np.array_equal(values.reshape(2, 256), dequantize(raw, T.Q3_K)))
    True
    """
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, BLOCK_BYTES)
    hmask, qs, packed = blocks[..., 0:32], blocks[..., 32:96], blocks[..., 96:108]
    d = np.ascontiguousarray(blocks[..., 108:110]).view(np.float16)[..., 0].astype(np.float32)
    aux = np.ascontiguousarray(packed).view(np.uint32)  # ggml's kmask unpacking of the 6-bit scales
    a0, a1, a2 = aux[..., 0], aux[..., 1], aux[..., 2]
    k1, k2 = np.uint32(0x03030303), np.uint32(0x0F0F0F0F)
    words = np.stack([(a0 & k2) | ((a2 & k1) << 4), (a1 & k2) | (((a2 >> 2) & k1) << 4),
                      ((a0 >> 4) & k2) | (((a2 >> 4) & k1) << 4), ((a1 >> 4) & k2) | (((a2 >> 6) & k1) << 4)], -1)
    scales = (np.ascontiguousarray(words).view(np.uint8).astype(np.int16) - 32).astype(np.int8)
    q = np.empty(blocks.shape[:2] + (256,), dtype=np.uint8)
    for j in range(2):
        for g in range(4):
            low = (qs[..., 32 * j:32 * j + 32] >> (2 * g)) & 3
            q[..., 128 * j + 32 * g:128 * j + 32 * g + 32] = low + 4 * ((hmask >> (4 * j + g)) & 1)
    return KQuantWeight(q, scales, np.zeros_like(scales), d, d, 4, NO_MINS)
