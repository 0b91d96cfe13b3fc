"""Q5_K weights for ``k_quant_lanes``: ``ggml_vec_dot_q5_K_q8_K`` (AVX2) below 8 activation rows, the tiled kernel
from 8 on (no x86 repack for Q5_K).

A Q5_K super-block of 256 weights (176 bytes) is fp16 ``d`` and ``dmin``, 12 bytes of 6-bit scales and mins (one
pair per 32 weights, ``get_scale_min_k4``), ``qh[32]`` (the fifth bits) and ``qs[128]`` (nibbles); weight
``d * scale * q - dmin * min`` with ``q`` in [0, 32). Chunk ``j`` of 64 weights: low nibbles of ``qs[32j:32j+32]``
plus bit ``2j`` of ``qh`` are weights ``64j..64j+31``, high nibbles plus bit ``2j+1`` the next 32.
"""
from __future__ import annotations

import numpy as np

from rocmforge.exact.k_quant_lanes import SCALAR_MINS, KQuantWeight

BLOCK_BYTES = 176


def scales_and_mins_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` of 12 packed bytes ``[..., 12]`` -> (8 scales, 8 mins), uint8 in [0, 64)."""
    s = packed.astype(np.uint8)
    scales = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mins = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return scales, mins


def split_q5_k(raw: np.ndarray) -> KQuantWeight:
    """Raw Q5_K rows ``[out, bytes]`` -> ``KQuantWeight`` (codes, each scale and min for its two 16-weight halves).

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import dequantize
    >>> raw = np.random.default_rng(0).integers(0, 256, (2, BLOCK_BYTES), dtype=np.uint8)
    >>> raw[:, :4] = np.array([0.01, 0.02], np.float16).view(np.uint8)
    >>> w = split_q5_k(raw)
    >>> values = (w.d[..., None] * w.scales[..., ::2].repeat(32, -1) * w.q.reshape(2, 1, 256)
    ...           - w.dmin[..., None] * w.mins[..., ::2].repeat(32, -1))
    >>> bool(np.array_equal(values.reshape(2, 256), dequantize(raw, T.Q5_K)))
    True
    """
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, BLOCK_BYTES)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    dmin = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
    scales, mins = scales_and_mins_k4(blocks[..., 4:16])
    qh, qs = blocks[..., 16:48], blocks[..., 48:176]
    q = np.empty(blocks.shape[:2] + (256,), dtype=np.uint8)
    for j in range(4):
        nibbles = qs[..., 32 * j:32 * j + 32]
        q[..., 64 * j:64 * j + 32] = (nibbles & 15) | (((qh >> (2 * j)) & 1) << 4)
        q[..., 64 * j + 32:64 * j + 64] = (nibbles >> 4) | (((qh >> (2 * j + 1)) & 1) << 4)
    return KQuantWeight(q, scales.repeat(2, -1).astype(np.int8), mins.repeat(2, -1).astype(np.int8), d, dmin, 0,
                        SCALAR_MINS)
