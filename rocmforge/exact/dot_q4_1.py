"""``x @ W.T`` for a Q4_1 weight exactly as ggml's AVX2 ``ggml_vec_dot_q4_1_q8_1`` computes each output
(arch/x86/quants.c; Q4_1 has no tinyBLAS or repack path on x86, so prefill and decode both use it).

A Q4_1 block (20 bytes) is fp16 ``d``, fp16 ``m``, 16 bytes of nibbles: element ``i < 16`` is the low nibble of
byte ``i``, element ``16 + i`` its high nibble; the weight is ``d*q + m``. Against a q8_1 activation block
(``dy``, ``s``, ``qy``) ggml keeps 8 float lanes; lane ``l`` owns elements ``4l..4l+3`` and per block does
``acc[l] = fma(d*dy, sum_4 q*qy, acc[l])`` (an exact integer sum, a float32 product ``d*dy``). The block minimums
add up separately in a float32 ``summs += m * s`` (both fp16 values, so ``m * s`` is exact in float32 and an fma
gives the same bits as GCC's code with or without contraction); the result is ``hsum8(acc) + summs``.
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


@njit(cache=True)
def _matmul(nibbles, wd, wm, xq, xd, xs, out):  # pragma: no cover - compiled
    # Integer lane sums first, in flat loops over the row's bytes that LLVM vectorizes (2.7x the speed of
    # per-block code); then per block the 8 lanes' fma and the minimums' fma, in ggml's order.
    n_out, nb = wd.shape
    n_bytes = nb * 16
    flat = nibbles.reshape(n_out, n_bytes)
    x_low, x_high = np.empty(n_bytes, np.int32), np.empty(n_bytes, np.int32)  # partners of low/high nibbles
    p_low, p_high = np.empty(n_bytes, np.int32), np.empty(n_bytes, np.int32)
    lanes_low, lanes_high = np.empty(nb * 4, np.int32), np.empty(nb * 4, np.int32)
    acc = np.empty(8, dtype=np.float32)
    for r in range(xq.shape[0]):
        for b in range(nb):
            for i in range(16):
                x_low[b * 16 + i] = xq[r, b, i]
                x_high[b * 16 + i] = xq[r, b, 16 + i]
        for o in range(n_out):
            w = flat[o]
            for j in range(n_bytes):
                v = np.int32(w[j])
                p_low[j] = (v & 15) * x_low[j]
                p_high[j] = (v >> 4) * x_high[j]
            for g in range(nb * 4):  # lane g % 4 (low nibbles) and 4 + g % 4 (high) of block g // 4
                lanes_low[g] = p_low[4 * g] + p_low[4 * g + 1] + p_low[4 * g + 2] + p_low[4 * g + 3]
                lanes_high[g] = p_high[4 * g] + p_high[4 * g + 1] + p_high[4 * g + 2] + p_high[4 * g + 3]
            acc[:] = 0
            summs = np.float32(0)
            for b in range(nb):
                summs = fma32(wm[o, b], xs[r, b], summs)
                d = wd[o, b] * xd[r, b]
                for lane in range(4):
                    acc[lane] = fma32(d, np.float32(lanes_low[4 * b + lane]), acc[lane])
                    acc[4 + lane] = fma32(d, np.float32(lanes_high[4 * b + lane]), acc[4 + lane])
            out[r, o] = hsum8(acc) + summs


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
    nibbles, wd, wm = weight
    out = np.empty((blocks.qs.shape[0], wd.shape[0]), dtype=np.float32)
    _matmul(np.ascontiguousarray(nibbles), wd, wm, blocks.qs, blocks.d, blocks.s, out)
    return out
