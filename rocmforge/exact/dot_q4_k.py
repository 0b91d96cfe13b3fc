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
Here each 32 weights' products come from ``lanes.lane_sums`` (one ``vpdpbusd``), times the sub-block scale.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from rocmforge.errors import UnsupportedError
from rocmforge.exact.lanes import (OUT_TILE, V8I32, V32I8, data_pointer, fma_f32, lane_sums, load_vector, offset,
                                   reduce_add)
from rocmforge.exact.q8_k_activations import Q8KBlocks, quantize_q8_k
from rocmforge.exact.threads import split_rows

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
    return q, scales, mins, d_dmin[..., 0].copy(), d_dmin[..., 1].copy()


def _row_dot(subs_per_fma: int, n_rows: int):
    """An intrinsic: one output's ``acc - acc_min`` over ``n_blocks`` super-blocks for ``n_rows`` consecutive
    activation rows (each weight sub-block loaded once for all), one fma pair per ``subs_per_fma`` sub-blocks of 32
    (2: GEMM rows, 8: GEMV rows); arguments are 1-D arrays with start indices. A float32, or a tuple per row."""

    @intrinsic
    def row_dot(typingctx, q, q0, sc, mins, sc0, wd, wdmin, wd0, x, x0, xsums, xsums0, xd, xd0, n_blocks):
        def codegen(context, builder, signature, args):
            q_ptr, sc_ptr, min_ptr, wd_ptr, wdmin_ptr, x_ptr, xs_ptr, xd_ptr = (
                data_pointer(context, builder, signature.args[i], args[i]) for i in (0, 2, 3, 5, 6, 8, 10, 12))
            q0, sc0, wd0, x0, xs0, xd0, n = (args[i] for i in (1, 4, 7, 9, 11, 13, 14))
            f32 = ir.FloatType()
            rows = range(n_rows)
            acc = [cgutils.alloca_once_value(builder, ir.Constant(f32, 0)) for _ in rows]
            acc_min = [cgutils.alloca_once_value(builder, ir.Constant(f32, 0)) for _ in rows]
            with cgutils.for_range(builder, n) as loop:
                b = loop.index
                rb = [builder.add(builder.mul(n, ir.Constant(n.type, r)), b) for r in rows]  # block b of row r
                scales = load_vector(builder, sc_ptr, offset(builder, sc0, b, 8), V8I32)
                mins_b = load_vector(builder, min_ptr, offset(builder, sc0, b, 8), V8I32)
                min_terms = [builder.mul(mins_b, load_vector(builder, xs_ptr, offset(builder, xs0, rb[r], 8), V8I32))
                             for r in rows]
                x_d = [builder.load(builder.gep(xd_ptr, [builder.add(xd0, rb[r])])) for r in rows]
                w_d = builder.load(builder.gep(wd_ptr, [builder.add(wd0, b)]))
                w_dmin = builder.load(builder.gep(wdmin_ptr, [builder.add(wd0, b)]))
                scale = [builder.fmul(w_d, x_d[r]) for r in rows]
                scale_min = [builder.fmul(w_dmin, x_d[r]) for r in rows]
                q_block = offset(builder, q0, b, 256)
                x_block = [offset(builder, x0, rb[r], 256) for r in rows]
                for first in range(0, 8, subs_per_fma):
                    group = [None] * n_rows
                    for sub in range(first, first + subs_per_fma):
                        q_bytes = load_vector(builder, q_ptr, q_block, V32I8, 32 * sub)
                        sub_scale = builder.shuffle_vector(scales, scales, ir.Constant(V8I32, [sub] * 8))
                        for r in rows:
                            sums = lane_sums(builder, q_bytes, load_vector(builder, x_ptr, x_block[r], V32I8, 32 * sub))
                            term = builder.mul(sums, sub_scale)
                            group[r] = term if group[r] is None else builder.add(group[r], term)
                    subs = ir.Constant(ir.VectorType(ir.IntType(32), subs_per_fma),
                                       list(range(first, first + subs_per_fma)))
                    for r in rows:
                        imin = reduce_add(builder, builder.shuffle_vector(min_terms[r], min_terms[r], subs))
                        isum = reduce_add(builder, group[r])
                        builder.store(fma_f32(builder, builder.sitofp(isum, f32), scale[r], builder.load(acc[r])),
                                      acc[r])
                        builder.store(fma_f32(builder, builder.sitofp(imin, f32), scale_min[r],
                                              builder.load(acc_min[r])), acc_min[r])
            results = [builder.fsub(builder.load(acc[r]), builder.load(acc_min[r])) for r in rows]
            return results[0] if n_rows == 1 else context.make_tuple(builder, signature.return_type, results)

        result = types.float32 if n_rows == 1 else types.UniTuple(types.float32, n_rows)
        return result(q, q0, sc, mins, sc0, wd, wdmin, wd0, x, x0, xsums, xsums0, xd, xd0, n_blocks), codegen

    return row_dot


_gemm_rows = _row_dot(subs_per_fma=2, n_rows=4)
_gemv_row = _row_dot(subs_per_fma=8, n_rows=1)


@njit(cache=True, nogil=True)
def _matmul(wq, wsc, wmin, wd, wdmin, xq, xd, xbsums, n_gemm_rows, out, start, stop):  # pragma: no cover
    # output rows start..stop
    nb = wd.shape[1]
    n = xq.shape[0]
    q, sc, mins = wq.reshape(-1), wsc.reshape(-1), wmin.reshape(-1)
    wd_flat, wdmin_flat = wd.reshape(-1), wdmin.reshape(-1)
    x, xd_flat = xq.reshape(-1), xd.reshape(-1)
    x_sums = np.empty(n * nb * 8, np.int32)  # activation sum of each 32-weight sub-block
    for r in range(n):
        for sub in range(nb * 8):
            b, half = sub >> 3, 2 * (sub & 7)
            x_sums[r * nb * 8 + sub] = np.int32(xbsums[r, b, half]) + np.int32(xbsums[r, b, half + 1])
    for o0 in range(start, stop, OUT_TILE):  # OUT_TILE weight rows stay in L1 while all activation rows pass
        o1 = min(o0 + OUT_TILE, stop)
        for r in range(0, n_gemm_rows, 4):  # ggml's GEMM takes the rows in groups of 4
            for o in range(o0, o1):
                out[r, o], out[r + 1, o], out[r + 2, o], out[r + 3, o] = _gemm_rows(
                    q, o * nb * 256, sc, mins, o * nb * 8, wd_flat, wdmin_flat, o * nb, x, r * nb * 256, x_sums,
                    r * nb * 8, xd_flat, r * nb, nb)
        for r in range(n_gemm_rows, n):
            for o in range(o0, o1):
                out[r, o] = _gemv_row(q, o * nb * 256, sc, mins, o * nb * 8, wd_flat, wdmin_flat, o * nb,
                                      x, r * nb * 256, x_sums, r * nb * 8, xd_flat, r * nb, nb)


@njit(cache=True, parallel=True)
def _matmul_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of output rows per thread (threads.split_rows)
        _matmul(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)


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
    args = (q, scales, mins, d, dmin, blocks.qs, blocks.d, blocks.bsums, n - n % 4, out)
    split_rows(_matmul_parallel, _matmul, args, d.shape[0], work=n * q[0].size * d.shape[0])
    return out
