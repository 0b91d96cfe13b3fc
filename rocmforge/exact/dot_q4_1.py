"""``x @ W.T`` for a Q4_1 weight exactly as ggml's AVX2 ``ggml_vec_dot_q4_1_q8_1`` computes each output
(arch/x86/quants.c; Q4_1 has no tinyBLAS or repack path on x86, so prefill and decode both use it).

A Q4_1 block (20 bytes) is fp16 ``d``, fp16 ``m``, 16 bytes of nibbles: element ``i < 16`` is the low nibble of
byte ``i``, element ``16 + i`` its high nibble; the weight is ``d*q + m``. Against a q8_1 activation block
(``dy``, ``s``, ``qy``) ggml keeps 8 float lanes; lane ``l`` owns elements ``4l..4l+3`` and per block does
``acc[l] = fma(d*dy, sum_4 q*qy, acc[l])`` (an exact integer sum, a float32 product ``d*dy``). The block minimums
add up separately in a float32 ``summs += m * s`` (both fp16 values, so ``m * s`` is exact in float32 and an fma
gives the same bits as GCC's code with or without contraction); the result is ``hsum8(acc) + summs``.
The low nibbles are lanes 0-3 and the high nibbles lanes 4-7 of ``lanes.nibble_lane_dot``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from rocmforge.exact.lanes import OUT_TILE, interleave4, nibble_lane_dot, nibble_lane_dot_x4
from rocmforge.exact.q8_activations import Q8Blocks, quantize_q8
from rocmforge.exact.simd import fma32
from rocmforge.exact.threads import split_rows

BLOCK_BYTES = 20


def split_q4_1(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw Q4_1 rows ``[out, bytes]`` -> (nibbles uint8 ``[out, nb * 16]``, d, m float32 ``[out, nb]``), contiguous
    (the nibbles stay packed: half the memory traffic of bytes, unpacked in registers)."""
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, BLOCK_BYTES)
    scales = np.ascontiguousarray(blocks[..., :4]).view(np.float16).astype(np.float32)
    nibbles = np.ascontiguousarray(blocks[..., 4:]).reshape(raw.shape[0], -1)
    return nibbles, scales[..., 0].copy(), scales[..., 1].copy()


@njit(cache=True, nogil=True)
def _matmul(q, wd, wm, xq, xd, xs_t, xi, xdi, out, start, stop):  # pragma: no cover - compiled
    # output rows start..stop, OUT_TILE at a time (their weight rows stay in L1 while all activation rows pass, and
    # each activation row's outputs are written as one cache line): ggml's 8 lanes through lane_dot (rows 4 at
    # a time from their interleaved copies xi, xdi: lanes.interleave4; the rest one by one), then the minimums'
    # fma chain added
    n_out, nb = wd.shape
    n = xq.shape[0]
    q_flat, wd_flat, x_flat, xd_flat = q.reshape(-1), wd.reshape(-1), xq.reshape(-1), xd.reshape(-1)
    xi_flat, xdi_flat = xi.reshape(-1), xdi.reshape(-1)
    summs = np.empty((OUT_TILE, n), dtype=np.float32)
    for o0 in range(start, stop, OUT_TILE):
        o1 = min(o0 + OUT_TILE, stop)
        for o in range(o0, o1 if n >= 4 else o0):  # prefill: the rows' chains side by side (vectorized)
            summs[o - o0] = 0
            for b in range(nb):
                for r in range(n):
                    summs[o - o0, r] = fma32(wm[o, b], xs_t[b, r], summs[o - o0, r])
        for g in range(xi.shape[0]):
            r = 4 * g
            for o in range(o0, o1):
                out[r, o], out[r + 1, o], out[r + 2, o], out[r + 3, o] = nibble_lane_dot_x4(
                    q_flat, o * nb * 16, wd_flat, o * nb, xi_flat, g * nb * 128, xdi_flat, g * nb * 4, nb)
        for r in range(4 * xi.shape[0], n):
            for o in range(o0, o1):
                out[r, o] = nibble_lane_dot(q_flat, o * nb * 16, wd_flat, o * nb, x_flat, r * nb * 32, xd_flat,
                                            r * nb, nb, 1)
        for r in range(n):
            for o in range(o0, o1):
                if n >= 4:
                    minimums = summs[o - o0, r]
                else:  # decode: one chain per output
                    minimums = np.float32(0)
                    for b in range(nb):
                        minimums = fma32(wm[o, b], xs_t[b, r], minimums)
                out[r, o] += minimums


@njit(cache=True, parallel=True)
def _matmul_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of output rows per thread (threads.split_rows)
        _matmul(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)


def matmul_q4_1(x: np.ndarray | Q8Blocks, weight: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
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
    nibbles, d, m = weight
    n, (n_out, k) = blocks.qs.shape[0], (nibbles.shape[0], 2 * nibbles.shape[1])
    out = np.empty((n, n_out), dtype=np.float32)
    sums_t = np.ascontiguousarray(blocks.s.T)  # [block, row]: the minimums' chains run over rows side by side
    args = (nibbles, d, m, blocks.qs, blocks.d, sums_t, interleave4(blocks.qs), interleave4(blocks.d), out)
    split_rows(_matmul_parallel, _matmul, args, n_out, work=n * k * n_out)
    return out
