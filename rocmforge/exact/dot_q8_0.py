"""``x @ W.T`` for a Q8_0 weight as ggml computes it on AVX2: ``ggml_vec_dot_q8_0_q8_0`` for one activation row
(decode) and llamafile's ``tinyBLAS_Q0_AVX`` for two or more (prefill). Both give each output the same bits:
8 float lanes, lane ``l`` owning elements ``4l..4l+3`` of every block, ``acc[l] = fma(dw*dx, sum_4 qw*qx, acc[l])``
with the float32 product of the two fp16 scales, then ``hsum8``. So one kernel serves both: ``lanes.q8_0_lane_dot``
(``q8_0_lane_dot_x4`` for four activation rows at once), reading the raw blocks in place (memory-mapped).

A Q8_0 block (34 bytes) is an fp16 scale and 32 int8 values. ``vpdpbusd`` multiplies unsigned by signed bytes, so
the kernel flips each weight byte's top bit (the weight + 128, unsigned) and subtracts ``128 * sum x`` per lane.
``matmul_lanes`` is the same kernel over weights unpacked to a byte each (``lanes.LaneWeight``: Q4_0, Q5_1 and
IQ4_NL, whose ggml paths end in these lanes).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from rocmforge.exact.lanes import (OUT_TILE, Q8_0_BLOCK, LaneWeight, interleave4, lane_dot, lane_dot_x4, q8_0_lane_dot,
                                   q8_0_lane_dot_x4)
from rocmforge.exact.q8_activations import Q8Blocks, quantize_q8
from rocmforge.exact.threads import split_rows


class RawBlocks(NamedTuple):
    """Weight rows as stored in the GGUF file: ``raw`` uint8 ``[out, nb * block bytes]`` (a view of the memory map,
    or of a group's stacked copy), read in place by the lane kernels (``lanes.BlockLayout``)."""

    raw: np.ndarray

    @property
    def n_out(self) -> int:
        return self.raw.shape[0]


def raw_rows(block_bytes: int):
    """A ``prepare`` for ``dot.MATMULS``: raw rows ``[out, bytes]`` -> ``RawBlocks`` (the same bytes, not copied)."""

    def prepare(raw: np.ndarray) -> RawBlocks:
        if raw.ndim != 2 or raw.shape[1] % block_bytes:
            raise ValueError(f"weight rows must be [out, n_blocks * {block_bytes}] bytes, got {raw.shape}")
        return RawBlocks(raw)

    return prepare


split_q8_0 = raw_rows(Q8_0_BLOCK.block_bytes)


@njit(cache=True, nogil=True)
def lane_corrections(xq, offset):  # pragma: no cover - compiled
    """``offset`` times the sum of each 4 activation bytes (the lane kernels' ``corr``), int32, flat."""
    x = xq.reshape(-1)
    corr = np.empty(x.size // 4, np.int32)
    for i in range(corr.size):
        corr[i] = offset * (np.int32(x[4 * i]) + np.int32(x[4 * i + 1]) + np.int32(x[4 * i + 2])
                            + np.int32(x[4 * i + 3]))
    return corr


@njit(cache=True, nogil=True)
def _matmul(raw, xq, xd, corr, xi, xdi, corri, out, start, stop):  # pragma: no cover - compiled
    # output rows start..stop, OUT_TILE at a time (their weight rows stay in L1 while all activation rows pass, and
    # each activation row's outputs are written as one cache line): activation rows 4 at a time from their
    # interleaved copies (xi, xdi, corri: lanes.interleave4), the rest one by one
    row_bytes = raw.shape[1]
    nb = row_bytes // Q8_0_BLOCK.block_bytes
    n = xq.shape[0]
    raw_flat, x_flat, xd_flat = raw.reshape(-1), xq.reshape(-1), xd.reshape(-1)
    xi_flat, xdi_flat, corri_flat = xi.reshape(-1), xdi.reshape(-1), corri.reshape(-1)
    for o0 in range(start, stop, OUT_TILE):
        o1 = min(o0 + OUT_TILE, stop)
        for g in range(xi.shape[0]):
            r = 4 * g
            for o in range(o0, o1):
                out[r, o], out[r + 1, o], out[r + 2, o], out[r + 3, o] = q8_0_lane_dot_x4(
                    raw_flat, o * row_bytes, xi_flat, g * nb * 128, xdi_flat, g * nb * 4, corri_flat, g * nb * 32, nb)
        for r in range(4 * xi.shape[0], n):
            for o in range(o0, o1):
                out[r, o] = q8_0_lane_dot(raw_flat, o * row_bytes, x_flat, r * nb * 32, xd_flat, r * nb, corr,
                                          r * nb * 8, nb, 1)


@njit(cache=True, parallel=True)
def _matmul_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of output rows per thread (threads.split_rows)
        _matmul(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)


def matmul_q8_0(x: np.ndarray | Q8Blocks, weight: RawBlocks) -> np.ndarray:
    """float32 ``x`` ``[n, k]`` (or its q8_0 blocks) times a Q8_0 weight (``split_q8_0`` of ``[out, k]``):
    ``[n, out]``.

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import quantize
    >>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    >>> y = matmul_q8_0(np.ones((1, 32), np.float32), split_q8_0(quantize(w, T.Q8_0)))
    >>> np.allclose(y, w.sum(axis=1), atol=0.02)
    True
    """
    return lane_matmul(x, (weight.raw,), weight.n_out, Q8_0_BLOCK.offset, _matmul, _matmul_parallel)


def lane_matmul(x: np.ndarray | Q8Blocks, weight: tuple[np.ndarray, ...], n_out: int, offset: int, kernel,
                driver) -> np.ndarray:
    """The q8_0-activation side shared by the lane kernels: round ``x``, its lane corrections for ``offset`` and
    their ``interleave4`` copies, then ``kernel(*weight, ...)`` over the ``n_out`` output rows
    (``threads.split_rows``)."""
    blocks = x if isinstance(x, Q8Blocks) else quantize_q8(x, with_sum=False)
    n, k = blocks.qs.shape[0], blocks.qs.shape[1] * 32
    out = np.empty((n, n_out), dtype=np.float32)
    corr = lane_corrections(blocks.qs, offset)
    args = (*weight, blocks.qs, blocks.d, corr, interleave4(blocks.qs), interleave4(blocks.d),
            interleave4(corr.reshape(n, -1, 8)), out)
    split_rows(driver, kernel, args, n_out, work=n * k * n_out)
    return out


@njit(cache=True, nogil=True)
def _matmul_unpacked(q, wd, xq, xd, corr, xi, xdi, corri, out, start, stop):  # pragma: no cover - compiled
    # _matmul over LaneWeight's bytes and float32 scales
    nb = wd.shape[1]
    n = xq.shape[0]
    q_flat, wd_flat, x_flat, xd_flat = q.reshape(-1), wd.reshape(-1), xq.reshape(-1), xd.reshape(-1)
    xi_flat, xdi_flat, corri_flat = xi.reshape(-1), xdi.reshape(-1), corri.reshape(-1)
    for o0 in range(start, stop, OUT_TILE):
        o1 = min(o0 + OUT_TILE, stop)
        for g in range(xi.shape[0]):
            r = 4 * g
            for o in range(o0, o1):
                out[r, o], out[r + 1, o], out[r + 2, o], out[r + 3, o] = lane_dot_x4(
                    q_flat, o * nb * 32, wd_flat, o * nb, xi_flat, g * nb * 128, xdi_flat, g * nb * 4, corri_flat,
                    g * nb * 32, nb)
        for r in range(4 * xi.shape[0], n):
            for o in range(o0, o1):
                out[r, o] = lane_dot(q_flat, o * nb * 32, wd_flat, o * nb, x_flat, r * nb * 32, xd_flat, r * nb,
                                     corr, r * nb * 8, nb, 1)


@njit(cache=True, parallel=True)
def _matmul_unpacked_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of output rows per thread (threads.split_rows)
        _matmul_unpacked(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)


def matmul_lanes(x: np.ndarray | Q8Blocks, weight: LaneWeight) -> np.ndarray:
    """float32 ``x`` ``[n, k]`` (or its q8_0 blocks) times a weight unpacked to ``LaneWeight`` ``[out, k]``:
    ``[n, out]``, each output ggml's Q8_0 lanes."""
    return lane_matmul(x, (weight.q, weight.d), weight.d.shape[0], weight.offset, _matmul_unpacked,
                       _matmul_unpacked_parallel)
