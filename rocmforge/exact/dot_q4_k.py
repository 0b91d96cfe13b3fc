"""``x @ W.T`` for a Q4_K weight exactly as ggml computes it on AVX2, where Q4_K weights are repacked
(``ggml_repack_get_optimal_repack_type``: AVX2 and a row count divisible by 8 -> ``q4_K_8x8_q8_K``, the
``CPU_REPACK`` buffer llama.cpp uses by default) and multiplied by ``ggml_gemm_q4_K_8x8_q8_K`` /
``ggml_gemv_q4_K_8x8_q8_K`` (arch/x86/repack.cpp), not by ``vec_dot_q4_K_q8_K``.

A Q4_K super-block of 256 weights (144 bytes) is fp16 ``d`` and ``dmin``, 12 bytes packing eight 6-bit
``scale``/``min`` pairs (one per 32 weights) and 128 bytes of nibbles; the weight is ``d*scale*q - dmin*min``.
The repacked kernels give each output column its own float lane and keep two float32 accumulators:
``acc += int(sum scale*q*q8) * (d * d_x)`` and ``acc_min += int(sum min*bsum) * (dmin * d_x)`` (fused
multiply-adds; the products of the two scales rounded to float32), result ``acc - acc_min``. They differ in how
often they round:

- GEMM (``forward_mul_mat_one_chunk`` sends the first ``n - n % 4`` activation rows, in groups of 4): one fma
  per 64 weights (two sub-blocks);
- GEMV (the last ``n % 4`` rows, so every row of a one-token decode step): one fma per super-block.

The integer sums are exact in both (int16 partial sums stay below 2^15), so only that split matters.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from rocmforge.errors import UnsupportedError
from rocmforge.exact.q8_k_activations import Q8KBlocks, quantize_q8_k
from rocmforge.exact.simd import fma32

BLOCK_BYTES = 144


def split_q4_k(raw: np.ndarray) -> tuple[np.ndarray, ...]:
    """Raw Q4_K rows ``[out, bytes]`` -> (``q`` uint8 in [0, 16) ``[out, nb, 256]``, scales and mins int32
    ``[out, nb, 8]``, ``d`` and ``dmin`` float32 ``[out, nb]``).

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import dequantize
    >>> raw = np.random.default_rng(0).integers(0, 256, (8, BLOCK_BYTES), dtype=np.uint8)
    >>> raw[:, :4] = np.array([0.01, 0.02], np.float16).view(np.uint8)
    >>> q, scales, mins, d, dmin = split_q4_k(raw)
    >>> w = (d[..., None] * scales)[..., None] * q.reshape(8, 1, 8, 32) - (dmin[..., None] * mins)[..., None]
    >>> bool(np.array_equal(w.reshape(8, 256), dequantize(raw, T.Q4_K)))
    True
    """
    if raw.shape[0] % 8:  # ggml repacks only then; otherwise vec_dot_q4_K_q8_K or the tiled matmul would run
        raise UnsupportedError(f"device='cpu-exact' has no exact Q4_K matmul for {raw.shape[0]} output rows "
                               "(llama.cpp repacks Q4_K only when the row count is a multiple of 8)")
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, BLOCK_BYTES)
    d_dmin = np.ascontiguousarray(blocks[..., :4]).view(np.float16).astype(np.float32)
    packed = blocks[..., 4:16].astype(np.int32)
    scales = np.empty(blocks.shape[:2] + (8,), dtype=np.int32)
    mins = np.empty_like(scales)
    # get_scale_min_k4 (ggml-quants.c): sub-blocks 0-3 in the low 6 bits, 4-7 split over nibbles and top bits
    scales[..., :4], mins[..., :4] = packed[..., 0:4] & 63, packed[..., 4:8] & 63
    scales[..., 4:] = (packed[..., 8:12] & 15) | ((packed[..., 0:4] >> 6) << 4)
    mins[..., 4:] = (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)
    nibbles = blocks[..., 16:].reshape(blocks.shape[:2] + (4, 32))  # 32 bytes hold 64 weights: low, then high
    q = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(blocks.shape[:2] + (256,))
    return q, scales, mins, d_dmin[..., 0], d_dmin[..., 1]


@njit(cache=True)
def _matmul(wq, wsc, wmin, wd, wdmin, xq, xd, xbsums, n_gemm_rows, out):  # pragma: no cover - compiled
    # Exact integer sums first, in flat loops LLVM vectorizes; then ggml's fma per 64 (GEMM) or 256 (GEMV) weights.
    n_out, nb = wd.shape
    k = nb * 256
    weights, scales, mins = wq.reshape(n_out, k), wsc.reshape(n_out, nb * 8), wmin.reshape(n_out, nb * 8)
    x = np.empty(k, np.int32)
    x_sums = np.empty(nb * 8, np.int32)  # activation sum of each 32-weight sub-block
    products = np.empty(k, np.int32)
    isums = np.empty(nb * 8, np.int32)
    imins = np.empty(nb * 8, np.int32)
    for r in range(xq.shape[0]):
        x[:] = xq[r].reshape(k)
        for sub in range(nb * 8):
            b, half = sub >> 3, 2 * (sub & 7)
            x_sums[sub] = np.int32(xbsums[r, b, half]) + np.int32(xbsums[r, b, half + 1])
        per_fma = 2 if r < n_gemm_rows else 8  # sub-blocks per fma: GEMM rows vs GEMV rows
        for o in range(n_out):
            w = weights[o]
            for j in range(k):
                products[j] = np.int32(w[j]) * x[j]
            for sub in range(nb * 8):
                part = np.int32(0)
                for j in range(32 * sub, 32 * sub + 32):
                    part += products[j]
                isums[sub] = scales[o, sub] * part
                imins[sub] = mins[o, sub] * x_sums[sub]
            acc = np.float32(0)
            acc_min = np.float32(0)
            for b in range(nb):
                scale = wd[o, b] * xd[r, b]
                scale_min = wdmin[o, b] * xd[r, b]
                for first in range(8 * b, 8 * b + 8, per_fma):
                    isum = np.int32(0)
                    imin = np.int32(0)
                    for sub in range(first, first + per_fma):
                        isum += isums[sub]
                        imin += imins[sub]
                    acc = fma32(np.float32(isum), scale, acc)
                    acc_min = fma32(np.float32(imin), scale_min, acc_min)
            out[r, o] = acc - acc_min


def matmul_q4_k(x: np.ndarray | Q8KBlocks, weight: tuple[np.ndarray, ...]) -> np.ndarray:
    """float32 ``x`` ``[n, k]`` (or its Q8_K blocks) times a repacked Q4_K weight (``split_q4_k`` of ``[out, k]``,
    ``out`` a multiple of 8) -> ``[n, out]``.

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import dequantize
    >>> raw = np.random.default_rng(0).integers(0, 256, (8, BLOCK_BYTES), dtype=np.uint8)
    >>> raw[:, :4] = np.array([0.01, 0.02], np.float16).view(np.uint8)
    >>> x = np.linspace(-1, 1, 5 * 256, dtype=np.float32).reshape(5, 256)
    >>> y = matmul_q4_k(x, split_q4_k(raw))
    >>> bool(np.allclose(y, x @ dequantize(raw, T.Q4_K).T, rtol=0.02, atol=0.05))
    True
    """
    blocks = x if isinstance(x, Q8KBlocks) else quantize_q8_k(x)
    n = blocks.qs.shape[0]
    q, scales, mins, d, dmin = weight
    out = np.empty((n, d.shape[0]), dtype=np.float32)
    _matmul(np.ascontiguousarray(q), np.ascontiguousarray(scales), np.ascontiguousarray(mins), d, dmin,
            blocks.qs, blocks.d, blocks.bsums, n - n % 4, out)
    return out
