"""``x @ W.T`` for a Q4_1 weight exactly as ggml's AVX2 ``ggml_vec_dot_q4_1_q8_1`` computes each output
(arch/x86/quants.c; Q4_1 has no tinyBLAS or repack path on x86, so prefill and decode both use it).

A Q4_1 block (20 bytes) is fp16 ``d``, fp16 ``m``, 16 bytes of nibbles: element ``i < 16`` is the low nibble of
byte ``i``, element ``16 + i`` its high nibble; the weight is ``d*q + m``. Against a q8_1 activation block
(``dy``, ``s``, ``qy``) ggml keeps 8 float lanes; lane ``l`` owns elements ``4l..4l+3`` and per block does
``acc[l] = fma(d*dy, sum_4 q*qy, acc[l])`` (an exact integer sum, a float32 product ``d*dy``). The block minimums
add up separately in a float32 ``summs += m * s`` (both fp16 values, so ``m * s`` is exact in float32 and an fma
gives the same bits as GCC's code with or without contraction); the result is ``hsum8(acc) + summs``.
The raw blocks are read in place (memory-mapped): ``lanes.q4_1_lane_dot`` splits the nibbles in registers (the
low nibbles are lanes 0-3, the high nibbles lanes 4-7) and the minimums read ``m`` where it is stored (``fp16_at``).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from rocmforge.exact.dot_q8_0 import RawBlocks, raw_rows
from rocmforge.exact.lane_tiles import TILE_OUTPUTS, byte_slot, tile_rows, unpack_q4_1
from rocmforge.exact.lanes import Q4_1_BLOCK, fp16_at, interleave4, q4_1_lane_dot
from rocmforge.exact.q8_activations import Q8Blocks, quantize_q8
from rocmforge.exact.simd import fma32
from rocmforge.exact.threads import split_rows

BLOCK_BYTES = Q4_1_BLOCK.block_bytes
split_q4_1 = raw_rows(BLOCK_BYTES)


@njit(cache=True, nogil=True)
def _matmul(raw, xq, xd, xs_t, xi, xdi, zeros, out, start, stop):  # pragma: no cover - compiled
    # output rows start..stop, TILE_OUTPUTS at a time: ggml's 8 lanes as dot_q8_0._matmul computes them (groups of 4
    # rows in lane_tiles' register tiles, with no lane correction: ``zeros``), then the minimums' fma chain added
    # (m: the fp16 at byte 2 of each block)
    row_bytes = raw.shape[1]
    nb = row_bytes // BLOCK_BYTES
    n = xq.shape[0]
    raw_flat, x_flat, xd_flat = raw.reshape(-1), xq.reshape(-1), xd.reshape(-1)
    grouped = 4 * xi.shape[0]
    w = np.empty(TILE_OUTPUTS * nb * 32 if grouped else 0, np.uint8)
    ws = np.empty(TILE_OUTPUTS * nb if grouped else 0, np.float32)
    summs = np.empty((TILE_OUTPUTS, n), dtype=np.float32)
    for o0 in range(start, stop, TILE_OUTPUTS):
        o1 = min(o0 + TILE_OUTPUTS, stop)
        for o in range(o0, o1 if n >= 4 else o0):  # prefill: the rows' chains side by side (vectorized)
            summs[o - o0] = 0
            for b in range(nb):
                m = fp16_at(raw_flat, o * row_bytes + b * BLOCK_BYTES + 2)
                for r in range(n):
                    summs[o - o0, r] = fma32(m, xs_t[b, r], summs[o - o0, r])
        done = o0
        if grouped:
            for o in range(o0, o1):
                for b in range(nb):
                    slot = byte_slot(o - o0, nb, b)
                    unpack_q4_1(raw_flat, o * row_bytes, b, w, slot, ws, slot >> 5)
            done = o0 + tile_rows(w, ws, o1 - o0, nb, xi, xdi, zeros, out, o0)
        for r in range(n):
            for o in range(done if r < grouped else o0, o1):
                out[r, o] = q4_1_lane_dot(raw_flat, o * row_bytes, x_flat, r * nb * 32, xd_flat, r * nb, nb, 1)
        for r in range(n):
            for o in range(o0, o1):
                if n >= 4:
                    minimums = summs[o - o0, r]
                else:  # decode: one chain per output
                    minimums = np.float32(0)
                    for b in range(nb):
                        minimums = fma32(fp16_at(raw_flat, o * row_bytes + b * BLOCK_BYTES + 2), xs_t[b, r],
                                         minimums)
                out[r, o] += minimums


@njit(cache=True, parallel=True)
def _matmul_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of output rows per thread (threads.split_rows)
        _matmul(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)


def matmul_q4_1(x: np.ndarray | Q8Blocks, weight: RawBlocks) -> np.ndarray:
    """float32 ``x`` ``[n, k]`` (or its q8_1 blocks) times a Q4_1 weight (``split_q4_1`` of ``[out, k]``):
    ``[n, out]``.

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import quantize
    >>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    >>> y = matmul_q4_1(np.ones((1, 32), np.float32), split_q4_1(quantize(w, T.Q4_1)))
    >>> np.allclose(y, w.sum(axis=1), atol=0.1)
    True
    """
    blocks = x if isinstance(x, Q8Blocks) else quantize_q8(x, with_sum=True)
    n, k = blocks.qs.shape[0], blocks.qs.shape[1] * 32
    out = np.empty((n, weight.n_out), dtype=np.float32)
    sums_t = np.ascontiguousarray(blocks.s.T)  # [block, row]: the minimums' chains run over rows side by side
    xi = interleave4(blocks.qs)
    zeros = np.zeros((*xi.shape[:3], 8), np.int32)  # Q4_1's bytes are the weights: no lane correction
    args = (weight.raw, blocks.qs, blocks.d, sums_t, xi, interleave4(blocks.d), zeros, out)
    split_rows(_matmul_parallel, _matmul, args, weight.n_out, work=n * k * weight.n_out)
    return out
