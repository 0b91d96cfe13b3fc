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
from rocmforge.exact.lanes import OUT_TILE, Q4_1_BLOCK, fp16_at, interleave4, q4_1_lane_dot, q4_1_lane_dot_x4
from rocmforge.exact.q8_activations import Q8Blocks, quantize_q8
from rocmforge.exact.simd import fma32
from rocmforge.exact.threads import split_rows

BLOCK_BYTES = Q4_1_BLOCK.block_bytes
split_q4_1 = raw_rows(BLOCK_BYTES)


@njit(cache=True, nogil=True)
def _matmul(raw, xq, xd, xs_t, xi, xdi, out, start, stop):  # pragma: no cover - compiled
    # output rows start..stop, OUT_TILE at a time (their weight rows stay in L1 while all activation rows pass, and
    # each activation row's outputs are written as one cache line): ggml's 8 lanes through lane_dot (rows 4 at
    # a time from their interleaved copies xi, xdi: lanes.interleave4; the rest one by one), then the minimums'
    # fma chain added (m: the fp16 at byte 2 of each block)
    row_bytes = raw.shape[1]
    nb = row_bytes // BLOCK_BYTES
    n = xq.shape[0]
    raw_flat, x_flat, xd_flat = raw.reshape(-1), xq.reshape(-1), xd.reshape(-1)
    xi_flat, xdi_flat = xi.reshape(-1), xdi.reshape(-1)
    summs = np.empty((OUT_TILE, n), dtype=np.float32)
    for o0 in range(start, stop, OUT_TILE):
        o1 = min(o0 + OUT_TILE, stop)
        for o in range(o0, o1 if n >= 4 else o0):  # prefill: the rows' chains side by side (vectorized)
            summs[o - o0] = 0
            for b in range(nb):
                m = fp16_at(raw_flat, o * row_bytes + b * BLOCK_BYTES + 2)
                for r in range(n):
                    summs[o - o0, r] = fma32(m, xs_t[b, r], summs[o - o0, r])
        for g in range(xi.shape[0]):
            r = 4 * g
            for o in range(o0, o1):
                out[r, o], out[r + 1, o], out[r + 2, o], out[r + 3, o] = q4_1_lane_dot_x4(
                    raw_flat, o * row_bytes, xi_flat, g * nb * 128, xdi_flat, g * nb * 4, nb)
        for r in range(4 * xi.shape[0], n):
            for o in range(o0, o1):
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
    args = (weight.raw, blocks.qs, blocks.d, sums_t, interleave4(blocks.qs), interleave4(blocks.d), out)
    split_rows(_matmul_parallel, _matmul, args, weight.n_out, work=n * k * weight.n_out)
    return out
