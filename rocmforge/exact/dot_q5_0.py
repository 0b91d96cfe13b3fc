"""Q5_0 weights for ``x @ W.T`` as ggml computes them on AVX2: unpacked to signed 5-bit values, they go through
the Q8_0 kernel (``rocmforge.exact.dot_q8_0.matmul_q8_0``) because ggml's two Q5_0 paths do exactly what its Q8_0
paths do once the weight bytes are formed.

``ggml_vec_dot_q5_0_q8_0`` (one activation row, arch/x86/quants.c) and llamafile's ``tinyBLAS_Q0_AVX<block_q5_0>``
(two or more rows, ``load(block_q5_0)`` = ``denibble | bittobyte``) both build the 32 bytes ``(q | h<<4) - 16``,
multiply them with the q8_0 activation bytes into 8 int32 lanes (lane ``l`` owns elements ``4l..4l+3``), then
``acc[l] = fma(d_w*d_x, lane, acc[l])`` per block and ``hsum8`` at the end.

A Q5_0 block (22 bytes) is an fp16 scale ``d``, a 32-bit mask ``qh`` of fifth bits and 16 bytes of nibbles:
element ``i < 16`` is the low nibble of byte ``i``, element ``16 + i`` its high nibble, bit ``j`` of ``qh`` the
fifth bit of element ``j``.
"""
from __future__ import annotations

import numpy as np

from rocmforge.exact.lanes import LaneWeight

BLOCK_BYTES = 22
OFFSET = 16  # (q | h<<4) - 16: the unsigned 5-bit value is the stored byte


def split_q5_0(raw: np.ndarray) -> LaneWeight:
    """Raw Q5_0 rows ``[out, bytes]`` -> ``LaneWeight`` (unsigned 5-bit values ``[out, k]``, offset 16, scales
    float32 ``[out, nb]``), what ``matmul_q8_0`` takes.

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import quantize
    >>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    >>> q, scales, offset = split_q5_0(quantize(w, T.Q5_0))
    >>> bool(np.abs((q.reshape(2, 1, 32).astype(int) - offset) * scales[..., None] - w.reshape(2, 1, 32)).max() < 0.04)
    True
    """
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, BLOCK_BYTES)
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    high = np.ascontiguousarray(blocks[..., 2:6]).view(np.uint32)            # [out, nb, 1]
    fifth = ((high >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # [out, nb, 32]
    nibbles = blocks[..., 6:]
    low = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).astype(np.uint8)
    return LaneWeight((low | (fifth << 4)).reshape(raw.shape[0], -1), scales, OFFSET)
