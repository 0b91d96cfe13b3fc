"""``x @ W.T`` for a Q8_0 weight as ggml computes it on AVX2: ``ggml_vec_dot_q8_0_q8_0`` for one activation row
(decode) and llamafile's ``tinyBLAS_Q0_AVX`` for two or more (prefill). Both give each output the same bits:
8 float lanes, lane ``l`` owning elements ``4l..4l+3`` of every block, ``acc[l] = fma(dw*dx, sum_4 qw*qx, acc[l])``
with the float32 product of the two fp16 scales, then ``hsum8``. So one kernel serves both.

A Q8_0 block (34 bytes) is an fp16 scale and 32 int8 values.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from rocmforge.exact.q8_activations import Q8Blocks, quantize_q8
from rocmforge.exact.simd import fma32, hsum8

BLOCK_BYTES = 34


def split_q8_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw Q8_0 rows ``[out, bytes]`` -> (int8 values ``[out, nb, 32]``, scales float32 ``[out, nb]``), both
    contiguous (the kernel reads them ~1.5x faster than strided views of the 34-byte blocks)."""
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, BLOCK_BYTES)
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    return np.ascontiguousarray(blocks[..., 2:]).view(np.int8), scales


@njit(cache=True)
def _matmul(wq, wd, xq, xd, out):  # pragma: no cover - compiled
    # Integer lane sums first, in flat loops that LLVM vectorizes; then per block the 8 lanes' fma in ggml's order.
    n_out, nb = wd.shape
    k = nb * 32
    flat = wq.reshape(n_out, k)
    x = np.empty(k, np.int32)
    products = np.empty(k, np.int32)
    lanes = np.empty(nb * 8, np.int32)
    acc = np.empty(8, dtype=np.float32)
    for r in range(xq.shape[0]):
        x[:] = xq[r].reshape(k)
        for o in range(n_out):
            w = flat[o]
            for j in range(k):
                products[j] = np.int32(w[j]) * x[j]
            for g in range(nb * 8):  # lane g % 8 of block g // 8: elements 4g..4g+3
                lanes[g] = products[4 * g] + products[4 * g + 1] + products[4 * g + 2] + products[4 * g + 3]
            acc[:] = 0
            for b in range(nb):
                d = wd[o, b] * xd[r, b]
                for lane in range(8):
                    acc[lane] = fma32(d, np.float32(lanes[8 * b + lane]), acc[lane])
            out[r, o] = hsum8(acc)


def matmul_q8_0(x: np.ndarray | Q8Blocks, weight: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
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
    blocks = x if isinstance(x, Q8Blocks) else quantize_q8(x, with_sum=False)
    wq, wd = weight
    out = np.empty((blocks.qs.shape[0], wd.shape[0]), dtype=np.float32)
    _matmul(np.ascontiguousarray(wq), wd, blocks.qs, blocks.d, out)
    return out
