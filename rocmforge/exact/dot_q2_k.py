"""Q2_K weights for ``k_quant_lanes``: ``ggml_vec_dot_q2_K_q8_K`` (AVX2) below 8 activation rows, the tiled kernel
from 8 on (llama.cpp repacks Q2_K only on AVX-512 builds).

A Q2_K super-block of 256 weights (84 bytes) is ``scales[16]`` (low nibble: the scale, high nibble: the min of
16 weights), ``qs[64]`` (2-bit codes) and fp16 ``d``, ``dmin``; weight ``d * scale * q - dmin * min``. Half ``j``
of 128 weights: bits ``2g..2g+1`` of ``qs[32j:32j+32]`` are weights ``128j + 32g .. 128j + 32g + 31``.
"""
from __future__ import annotations

import numpy as np

from rocmforge.exact.k_quant_lanes import LANE_MINS, KQuantWeight

BLOCK_BYTES = 84


def split_q2_k(raw: np.ndarray) -> KQuantWeight:
    """Raw Q2_K rows ``[out, bytes]`` -> ``KQuantWeight``.

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import dequantize
    >>> raw = np.random.default_rng(0).integers(0, 256, (2, BLOCK_BYTES), dtype=np.uint8)
    >>> raw[:, 80:] = np.array([0.01, 0.02], np.float16).view(np.uint8)
    >>> w = split_q2_k(raw)
    >>> values = (w.d[..., None] * w.scales.repeat(16, -1) * w.q.reshape(2, 1, 256)
    ...           - w.dmin[..., None] * w.mins.repeat(16, -1))
    >>> bool(np.array_equal(values.reshape(2, 256), dequantize(raw, T.Q2_K)))
    True
    """
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, BLOCK_BYTES)
    packed, qs = blocks[..., 0:16], blocks[..., 16:80]
    d = np.ascontiguousarray(blocks[..., 80:82]).view(np.float16)[..., 0].astype(np.float32)
    dmin = np.ascontiguousarray(blocks[..., 82:84]).view(np.float16)[..., 0].astype(np.float32)
    q = np.empty(blocks.shape[:2] + (256,), dtype=np.uint8)
    for j in range(2):
        for g in range(4):
            q[..., 128 * j + 32 * g:128 * j + 32 * g + 32] = (qs[..., 32 * j:32 * j + 32] >> (2 * g)) & 3
    return KQuantWeight(q, (packed & 15).astype(np.int8), (packed >> 4).astype(np.int8), d, dmin, 0, LANE_MINS)
