"""``x @ W.T`` for a Q6_K weight exactly as ggml's x86 CPU backend computes each output. Q6_K has no tinyBLAS or
AVX2 repack path; which kernel runs depends on the number of activation rows ``n``:

- ``n < 8``: ``ggml_vec_dot_q6_K_q8_K`` (arch/x86/quants.c, AVX2). ggml multiplies the unsigned ``q`` with the
  Q8_K activation bytes into 8 int32 lanes -- lane ``l`` owns elements ``32c + 4l .. 32c + 4l + 3`` of every
  32-element chunk ``c`` (``maddubs`` then ``madd`` with the 16-weight scale) -- and takes the ``-32`` back with
  the activation block sums, lane ``l`` getting ``32 * (bsums[2l]*scales[2l] + bsums[2l+1]*scales[2l+1])``. Per
  super-block ``acc[l] = fma(d_x*d_w, lane, acc[l])`` with the float32 product of the scales; result ``hsum8(acc)``.
- ``n >= 8``: the tiled K-quant matmul (ggml-cpu/tiled, ``ggml_tiled_min_batch``; on by default). Per super-block
  it forms the whole block's exact integer ``s = sum scale * (q - 32) * q8``, then
  ``acc = fma(d_w * float(s), d_x, acc)`` (``tiled_run_microtile_avx2``'s epilogue), over the blocks in order.

A Q6_K super-block of 256 weights (210 bytes) is ``ql[128]`` (low nibbles), ``qh[64]`` (2-bit high parts),
``scales[16]`` (int8, one per 16 weights) and an fp16 ``d``; the weight is ``d * scale * (q - 32)`` with ``q`` in
[0, 64).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from rocmforge.exact.q8_k_activations import Q8KBlocks, quantize_q8_k
from rocmforge.exact.simd import fma32, hsum8

BLOCK_BYTES = 210
TILED_MIN_ROWS = 8  # ggml_tiled_min_batch: from 8 rows on, the tiled kernel


def split_q6_k(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw Q6_K rows ``[out, bytes]`` -> (``q`` uint8 in [0, 64) ``[out, nb, 256]``, scales int8 ``[out, nb, 16]``,
    ``d`` float32 ``[out, nb]``).

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import dequantize
    >>> raw = np.random.default_rng(0).integers(0, 256, (2, BLOCK_BYTES), dtype=np.uint8)
    >>> raw[:, 208:] = np.array([0.01], np.float16).view(np.uint8)
    >>> q, scales, d = split_q6_k(raw)
    >>> w = d[..., None, None] * scales[..., None] * (q.reshape(2, 1, 16, 16) - 32.0)
    >>> bool(np.array_equal(w.reshape(2, 256), dequantize(raw, T.Q6_K)))
    True
    """
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, BLOCK_BYTES)
    ql, qh = blocks[..., :128], blocks[..., 128:192]
    scales = blocks[..., 192:208].view(np.int8)
    d = np.ascontiguousarray(blocks[..., 208:]).view(np.float16)[..., 0].astype(np.float32)
    q = np.empty(blocks.shape[:2] + (256,), dtype=np.uint8)
    for half in range(2):  # 128 weights from ql[64h:64h+64] and qh[32h:32h+32]
        low, high, out = ql[..., 64 * half:64 * half + 64], qh[..., 32 * half:32 * half + 32], 128 * half
        q[..., out:out + 32] = (low[..., :32] & 15) | ((high & 3) << 4)
        q[..., out + 32:out + 64] = (low[..., 32:] & 15) | (((high >> 2) & 3) << 4)
        q[..., out + 64:out + 96] = (low[..., :32] >> 4) | (((high >> 4) & 3) << 4)
        q[..., out + 96:out + 128] = (low[..., 32:] >> 4) | (((high >> 6) & 3) << 4)
    return q, np.ascontiguousarray(scales), d


@njit(cache=True)
def _matmul(wq, wsc, wd, xq, xd, xbsums, tiled, out):  # pragma: no cover - compiled
    # Exact integer sums first, in flat loops LLVM vectorizes; then ggml's lanes and fma order.
    n_out, nb = wd.shape
    k = nb * 256
    weights, scales = wq.reshape(n_out, k), wsc.reshape(n_out, nb * 16)
    x = np.empty(k, np.int32)
    products = np.empty(k, np.int32)
    chunks = np.empty(k // 4, np.int32)  # scale * (4 consecutive products): one int32 lane's share of a maddubs
    lanes = np.empty(nb * 8, np.int32)
    acc = np.empty(8, dtype=np.float32)
    for r in range(xq.shape[0]):
        x[:] = xq[r].reshape(k)
        for o in range(n_out):
            w, sc = weights[o], scales[o]
            for j in range(k):
                products[j] = np.int32(w[j]) * x[j]
            for c in range(k // 4):  # 16 weights (4 chunks) share a scale
                chunks[c] = (products[4 * c] + products[4 * c + 1] + products[4 * c + 2] + products[4 * c + 3]) \
                    * np.int32(sc[c >> 2])
            lanes[:] = 0
            for b in range(nb):  # chunk c of block b feeds lane c % 8
                for m in range(8):
                    for lane in range(8):
                        lanes[8 * b + lane] += chunks[64 * b + 8 * m + lane]
                for lane in range(8):  # the -32 offset, through the activation sums of each 16
                    g = 16 * b + 2 * lane
                    lanes[8 * b + lane] -= 32 * (np.int32(xbsums[r, b, 2 * lane]) * np.int32(sc[g])
                                                 + np.int32(xbsums[r, b, 2 * lane + 1]) * np.int32(sc[g + 1]))
            acc[:] = 0
            for b in range(nb):
                if tiled:
                    acc[0] = fma32(wd[o, b] * np.float32(lanes[8 * b:8 * b + 8].sum()), xd[r, b], acc[0])
                else:
                    d = xd[r, b] * wd[o, b]
                    for lane in range(8):
                        acc[lane] = fma32(d, np.float32(lanes[8 * b + lane]), acc[lane])
            out[r, o] = acc[0] if tiled else hsum8(acc)


def matmul_q6_k(x: np.ndarray | Q8KBlocks, weight: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """float32 ``x`` ``[n, k]`` (or its Q8_K blocks) times a Q6_K weight (``split_q6_k`` of ``[out, k]``):
    ``[n, out]``.

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import dequantize
    >>> raw = np.random.default_rng(0).integers(0, 256, (2, BLOCK_BYTES), dtype=np.uint8)
    >>> raw[:, 208:] = np.array([0.01], np.float16).view(np.uint8)
    >>> x = np.linspace(-1, 1, 256, dtype=np.float32)[None]
    >>> y = matmul_q6_k(x, split_q6_k(raw))
    >>> bool(np.allclose(y, x @ dequantize(raw, T.Q6_K).T, rtol=0.02))
    True
    """
    blocks = x if isinstance(x, Q8KBlocks) else quantize_q8_k(x)
    wq, wsc, wd = weight
    out = np.empty((blocks.qs.shape[0], wd.shape[0]), dtype=np.float32)
    tiled = blocks.qs.shape[0] >= TILED_MIN_ROWS
    _matmul(np.ascontiguousarray(wq), wsc, wd, blocks.qs, blocks.d, blocks.bsums, tiled, out)
    return out
