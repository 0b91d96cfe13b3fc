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

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from rocmforge.exact.dot_q8_0 import lane_corrections
from rocmforge.exact.lanes import OUT_TILE, Q5_0_BLOCK_BYTES, interleave4, q5_0_lane_dot, q5_0_lane_dot_x4
from rocmforge.exact.q8_activations import Q8Blocks, quantize_q8
from rocmforge.exact.threads import split_rows

OFFSET = 16  # (q | h<<4) - 16: the unsigned 5-bit value is the byte the kernel forms


class Q5_0Weight(NamedTuple):
    """Q5_0 rows as stored: ``raw`` uint8 ``[out, nb * 22]`` (a view of the memory-mapped file, or of a group's
    stacked copy)."""

    raw: np.ndarray

    @property
    def n_out(self) -> int:
        return self.raw.shape[0]


def split_q5_0(raw: np.ndarray) -> Q5_0Weight:
    """Raw Q5_0 rows ``[out, bytes]`` -> ``Q5_0Weight`` (the same bytes, not copied), what ``matmul_q5_0`` takes."""
    if raw.ndim != 2 or raw.shape[1] % Q5_0_BLOCK_BYTES:
        raise ValueError(f"Q5_0 rows must be [out, n_blocks * {Q5_0_BLOCK_BYTES}] bytes, got {raw.shape}")
    return Q5_0Weight(raw)


@njit(cache=True, nogil=True)
def _matmul(raw, xq, xd, corr, xi, xdi, corri, out, start, stop):  # pragma: no cover - compiled
    # dot_q8_0._matmul over raw blocks: output rows OUT_TILE at a time, activation rows 4 at a time from their
    # interleaved copies (xi, xdi, corri: lanes.interleave4), the rest one by one
    n_out, row_bytes = raw.shape
    nb = row_bytes // Q5_0_BLOCK_BYTES
    n = xq.shape[0]
    raw_flat, x_flat, xd_flat = raw.reshape(-1), xq.reshape(-1), xd.reshape(-1)
    xi_flat, xdi_flat, corri_flat = xi.reshape(-1), xdi.reshape(-1), corri.reshape(-1)
    for o0 in range(start, stop, OUT_TILE):
        o1 = min(o0 + OUT_TILE, stop)
        for g in range(xi.shape[0]):
            r = 4 * g
            for o in range(o0, o1):
                out[r, o], out[r + 1, o], out[r + 2, o], out[r + 3, o] = q5_0_lane_dot_x4(
                    raw_flat, o * row_bytes, xi_flat, g * nb * 128, xdi_flat, g * nb * 4, corri_flat, g * nb * 32, nb)
        for r in range(4 * xi.shape[0], n):
            for o in range(o0, o1):
                out[r, o] = q5_0_lane_dot(raw_flat, o * row_bytes, x_flat, r * nb * 32, xd_flat, r * nb, corr,
                                          r * nb * 8, nb, 1)


@njit(cache=True, parallel=True)
def _matmul_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of output rows per thread (threads.split_rows)
        _matmul(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)


def matmul_q5_0(x: np.ndarray | Q8Blocks, weight: Q5_0Weight) -> np.ndarray:
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
    blocks = x if isinstance(x, Q8Blocks) else quantize_q8(x, with_sum=False)
    n, k = blocks.qs.shape[0], blocks.qs.shape[1] * 32
    out = np.empty((n, weight.n_out), dtype=np.float32)
    corr = lane_corrections(blocks.qs, OFFSET)
    args = (weight.raw, blocks.qs, blocks.d, corr, interleave4(blocks.qs), interleave4(blocks.d),
            interleave4(corr.reshape(n, -1, 8)), out)
    split_rows(_matmul_parallel, _matmul, args, weight.n_out, work=n * k * weight.n_out)
    return out
