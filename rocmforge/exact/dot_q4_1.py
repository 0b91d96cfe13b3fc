"""``x @ W.T`` for a Q4_1 weight exactly as ggml's AVX2 ``ggml_vec_dot_q4_1_q8_1`` computes each output
(arch/x86/quants.c; Q4_1 has no tinyBLAS or repack path on x86, so prefill and decode both use it).

A Q4_1 block (20 bytes) is fp16 ``d``, fp16 ``m``, 16 bytes of nibbles: element ``i < 16`` is the low nibble of
byte ``i``, element ``16 + i`` its high nibble; the weight is ``d*q + m``. Against a q8_1 activation block
(``dy``, ``s``, ``qy``) ggml keeps 8 float lanes; lane ``l`` owns elements ``4l..4l+3`` and per block does
``acc[l] = fma(d*dy, sum_4 q*qy, acc[l])`` (an exact integer sum, a float32 product ``d*dy``). The block minimums
add up separately in a float32 ``summs += m * s`` (GCC contracts it into an fma); the result is
``hsum8(acc) + summs``.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from rocmforge.exact.q8_activations import Q8Blocks, quantize_q8
from rocmforge.exact.simd import fma32, hsum8

BLOCK_BYTES = 20


def split_q4_1(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw Q4_1 rows ``[out, bytes]`` -> (nibbles uint8 ``[out, nb, 16]``, d, m float32 ``[out, nb]``), contiguous
    (the kernel reads them ~1.5x faster than strided views of the 20-byte blocks)."""
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, BLOCK_BYTES)
    scales = np.ascontiguousarray(blocks[..., :4]).view(np.float16).astype(np.float32)
    return np.ascontiguousarray(blocks[..., 4:]), scales[..., 0].copy(), scales[..., 1].copy()


@njit(inline="always")
def _lane(w, x, first, shift):
    # sum of 4 products: nibbles (low: shift 0, high: shift 4) of bytes first..first+3 times their activations
    return (((np.int32(w[first]) >> shift) & 15) * np.int32(x[0])
            + ((np.int32(w[first + 1]) >> shift) & 15) * np.int32(x[1])
            + ((np.int32(w[first + 2]) >> shift) & 15) * np.int32(x[2])
            + ((np.int32(w[first + 3]) >> shift) & 15) * np.int32(x[3]))


@njit(cache=True)
def _matmul(nibbles, wd, wm, xq, xd, xs, out):  # pragma: no cover - compiled
    n_out, nb = wd.shape
    acc = np.empty(8, dtype=np.float32)
    for o in range(n_out):
        for r in range(xq.shape[0]):
            acc[:] = 0
            summs = np.float32(0)
            for b in range(nb):
                summs = fma32(wm[o, b], xs[r, b], summs)
                d = wd[o, b] * xd[r, b]
                w, x = nibbles[o, b], xq[r, b]
                for lane in range(4):
                    acc[lane] = fma32(d, np.float32(_lane(w, x[4 * lane:], 4 * lane, 0)), acc[lane])
                    acc[4 + lane] = fma32(d, np.float32(_lane(w, x[16 + 4 * lane:], 4 * lane, 4)), acc[4 + lane])
            out[r, o] = hsum8(acc) + summs


def matmul_q4_1(x: np.ndarray | Q8Blocks, weight: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """float32 ``x`` ``[n, k]`` (or its q8_1 blocks) times a Q4_1 weight (``split_q4_1`` of ``[out, k]``) -> ``[n, out]``.

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import quantize
    >>> w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    >>> y = matmul_q4_1(np.ones((1, 32), np.float32), split_q4_1(quantize(w, T.Q4_1)))
    >>> np.allclose(y, w.sum(axis=1), atol=0.1)
    True
    """
    blocks = x if isinstance(x, Q8Blocks) else quantize_q8(x, with_sum=True)
    nibbles, wd, wm = weight
    out = np.empty((blocks.qs.shape[0], wd.shape[0]), dtype=np.float32)
    _matmul(nibbles, wd, wm, blocks.qs, blocks.d, blocks.s, out)
    return out
