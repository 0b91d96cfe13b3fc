"""``x @ W.T`` for a Q8_0 weight as ggml computes it on AVX2: ``ggml_vec_dot_q8_0_q8_0`` for one activation row
(decode) and llamafile's ``tinyBLAS_Q0_AVX`` for two or more (prefill). Both give each output the same bits:
8 float lanes, lane ``l`` owning elements ``4l..4l+3`` of every block, ``acc[l] = fma(dw*dx, sum_4 qw*qx, acc[l])``
with the float32 product of the two fp16 scales, then ``hsum8``. So one kernel serves both: ``lanes.q8_0_lane_dot``
reading the raw blocks in place (memory-mapped), or for four activation rows and more ``lane_tiles``' register
tiles over blocks decoded once per tile of outputs.

A Q8_0 block (34 bytes) is an fp16 scale and 32 int8 values. ``vpdpbusd`` multiplies unsigned by signed bytes, so
the kernel flips each weight byte's top bit (the weight + 128, unsigned) and subtracts ``128 * sum x`` per lane.
``matmul_lanes`` is the same kernel over weights unpacked to a byte each (``lanes.LaneWeight``: Q4_0, Q5_1 and
IQ4_NL, whose ggml paths end in these lanes).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from rocmforge.exact.lane_tiles import TILE_OUTPUTS, byte_slot, tile_rows, unpack_q8_0
from rocmforge.exact.lanes import Q8_0_BLOCK, LaneWeight, interleave4, lane_dot, q8_0_lane_dot
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
def _matmul(raw, xq, xd, corr, xi, xdi, ncorri, out, start, stop):  # pragma: no cover - compiled
    # output rows start..stop, TILE_OUTPUTS at a time: with 4 or more activation rows their blocks are decoded once
    # into scratch and every interleaved group of 4 rows (xi, xdi, ncorri: lanes.interleave4) passes over them in
    # register tiles (lane_tiles); the other rows (and an odd last output) one by one
    row_bytes = raw.shape[1]
    nb = row_bytes // Q8_0_BLOCK.block_bytes
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
                    unpack_q8_0(raw_flat, o * row_bytes, b, w, slot, ws, slot >> 5)
            done = o0 + tile_rows(w, ws, o1 - o0, nb, xi, xdi, ncorri, out, o0)
        for r in range(n):
            for o in range(done if r < grouped else o0, o1):
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
            np.negative(interleave4(corr.reshape(n, -1, 8))), out)
    split_rows(driver, kernel, args, n_out, work=n * k * n_out)
    return out


@njit(cache=True, nogil=True)
def _matmul_unpacked(q, wd, xq, xd, corr, xi, xdi, ncorri, out, start, stop):  # pragma: no cover - compiled
    # _matmul over LaneWeight's bytes and float32 scales
    nb = wd.shape[1]
    n, grouped = xq.shape[0], 4 * xi.shape[0]
    q_flat, wd_flat, x_flat, xd_flat = q.reshape(-1), wd.reshape(-1), xq.reshape(-1), xd.reshape(-1)
    w = np.empty(TILE_OUTPUTS * nb * 32 if grouped else 0, np.uint8)
    ws = np.empty(TILE_OUTPUTS * nb if grouped else 0, np.float32)
    for o0 in range(start, stop, TILE_OUTPUTS):
        o1 = min(o0 + TILE_OUTPUTS, stop)
        done = o0
        if grouped:
            for o in range(o0, o1):
                for b in range(nb):
                    slot = byte_slot(o - o0, nb, b)
                    w[slot:slot + 32] = q_flat[(o * nb + b) * 32:(o * nb + b + 1) * 32]
                    ws[slot >> 5] = wd[o, b]
            done = o0 + tile_rows(w, ws, o1 - o0, nb, xi, xdi, ncorri, out, o0)
        for r in range(n):
            for o in range(done if r < grouped else o0, o1):
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
