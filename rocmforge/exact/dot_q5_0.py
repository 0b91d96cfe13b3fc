"""``x @ W.T`` for a Q5_0 weight as ggml computes it on AVX2, reading the raw GGUF blocks in place (memory-mapped,
no unpacked copy): ggml's two Q5_0 paths do exactly what its Q8_0 paths do once the weight bytes are formed, so
this is ``dot_q8_0``'s kernel with the bytes built in registers (``lanes.q5_0_lane_dot``).

``ggml_vec_dot_q5_0_q8_0`` (one activation row, arch/x86/quants.c) and llamafile's ``tinyBLAS_Q0_AVX<block_q5_0>``
(two or more rows, ``load(block_q5_0)`` = ``denibble | bittobyte``) both build the 32 bytes ``(q | h<<4) - 16``,
multiply them with the q8_0 activation bytes into 8 int32 lanes (lane ``l`` owns elements ``4l..4l+3``), then
``acc[l] = fma(d_w*d_x, lane, acc[l])`` per block and ``hsum8`` at the end. Here the unsigned ``q | h<<4`` meets
the activations in one ``vpdpbusd`` and the ``- 16`` comes back as ``16 * sum x`` per lane (exact integers).

A Q5_0 block (22 bytes) is an fp16 scale ``d``, a 32-bit mask ``qh`` of fifth bits and 16 bytes of nibbles:
element ``i < 16`` is the low nibble of byte ``i``, element ``16 + i`` its high nibble, bit ``j`` of ``qh`` the
fifth bit of element ``j``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from rocmforge.exact.dot_q8_0 import RawBlocks, lane_matmul, raw_rows
from rocmforge.exact.lane_tiles import TILE_OUTPUTS, byte_slot, tile_rows, unpack_q5_0
from rocmforge.exact.lanes import Q5_0_BLOCK, q5_0_lane_dot
from rocmforge.exact.q8_activations import Q8Blocks

split_q5_0 = raw_rows(Q5_0_BLOCK.block_bytes)


@njit(cache=True, nogil=True)
def _matmul(raw, xq, xd, corr, xi, xdi, ncorri, out, start, stop):  # pragma: no cover - compiled
    # dot_q8_0._matmul with Q5_0 blocks
    row_bytes = raw.shape[1]
    nb = row_bytes // Q5_0_BLOCK.block_bytes
    n, grouped = xq.shape[0], 4 * xi.shape[0]
    raw_flat, x_flat, xd_flat = raw.reshape(-1), xq.reshape(-1), xd.reshape(-1)
    w = np.empty(TILE_OUTPUTS * nb * 32 if grouped else 0, np.uint8)
    ws = np.empty(TILE_OUTPUTS * nb if grouped else 0, np.float32)
    for o0 in range(start, stop, TILE_OUTPUTS):
        o1 = min(o0 + TILE_OUTPUTS, stop)
        done = o0
        if grouped:
            for o in range(o0, o1):
                for b in range(nb):
                    slot = byte_slot(o - o0, nb, b)
                    unpack_q5_0(raw_flat, o * row_bytes, b, w, slot, ws, slot >> 5)
            done = o0 + tile_rows(w, ws, o1 - o0, nb, xi, xdi, ncorri, out, o0)
        for r in range(n):
            for o in range(done if r < grouped else o0, o1):
                out[r, o] = q5_0_lane_dot(raw_flat, o * row_bytes, x_flat, r * nb * 32, xd_flat, r * nb, corr,
                                          r * nb * 8, nb, 1)


@njit(cache=True, parallel=True)
def _matmul_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of output rows per thread (threads.split_rows)
        _matmul(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)


def matmul_q5_0(x: np.ndarray | Q8Blocks, weight: RawBlocks) -> np.ndarray:
    """float32 ``x`` ``[n, k]`` (or its q8_0 blocks) times a Q5_0 weight (``split_q5_0`` of ``[out, k]``):
    ``[n, out]``.

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import dequantize, quantize
    >>> raw = quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), T.Q5_0)
    >>> y = matmul_q5_0(np.ones((1, 32), np.float32), split_q5_0(raw))
    >>> np.allclose(y, dequantize(raw, T.Q5_0).sum(axis=1), atol=0.01)
    True
    """
    return lane_matmul(x, (weight.raw,), weight.n_out, Q5_0_BLOCK.offset, _matmul, _matmul_parallel)
