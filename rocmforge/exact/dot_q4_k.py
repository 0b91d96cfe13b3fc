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

The integer sums are exact in both (int16 partial sums stay below 2^15), so only that split matters. Here, as
there, 8 outputs are 8 float lanes (``split_q4_k``'s column groups): a sub-block's 32 products of each output
come from 8 ``vpdpbusd`` (int32 lanes, exact), times its scale; the float part is ggml's, a lane per output.
"""
from __future__ import annotations

from functools import reduce

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from rocmforge.errors import UnsupportedError
from rocmforge.exact.lanes import (HAS_VNNI, PREFETCH_BYTES, V8F32, V8I32, V32I8, data_pointer, fma_v8, lane_sums,
                                   load_vector, offset, prefetch, splat)
from rocmforge.exact.q8_k_activations import Q8KBlocks, quantize_q8_k
from rocmforge.exact.threads import split_rows

_I32 = ir.IntType(32)

BLOCK_BYTES = 144


def split_q4_k(raw: np.ndarray) -> tuple[np.ndarray, ...]:
    """Raw Q4_K rows ``[out, bytes]`` -> the weight in column groups of 8 outputs (``g = out / 8``, ``nb``
    super-blocks), a float lane per output as ggml's repacked Q4_K keeps them: ``q`` uint8 in [0, 16)
    ``[g, nb, 8 sub-blocks, 8 quads, 8 outputs, 4]`` (each output's 4 consecutive weights of a quad side by side, one
    ``vpdpbusd`` operand), scales and mins int32 ``[g, nb, 8 sub-blocks, 8 outputs]``, ``d`` and ``dmin`` float32
    ``[g, nb, 8 outputs]``.

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import dequantize
    >>> raw = np.random.default_rng(0).integers(0, 256, (8, BLOCK_BYTES), dtype=np.uint8)
    >>> raw[:, :4] = np.array([0.01, 0.02], np.float16).view(np.uint8)
    >>> q, scales, mins, d, dmin = split_q4_k(raw)
    >>> q_rows = q.transpose(0, 4, 1, 2, 3, 5).reshape(8, 1, 8, 32)  # back to [out, nb, sub-block, 32]
    >>> scales, mins = (a.transpose(0, 3, 1, 2).reshape(8, 1, 8) for a in (scales, mins))
    >>> d, dmin = (a.transpose(0, 2, 1).reshape(8, 1) for a in (d, dmin))
    >>> w = (d[..., None] * scales)[..., None] * q_rows - (dmin[..., None] * mins)[..., None]
    >>> bool(np.array_equal(w.reshape(8, 256), dequantize(raw, T.Q4_K)))
    True
    """
    if raw.shape[0] % 8:  # ggml repacks only then; otherwise vec_dot_q4_K_q8_K or the tiled matmul would run
        raise UnsupportedError(f"device='cpu-exact' has no exact Q4_K matmul for {raw.shape[0]} output rows "
                               "(llama.cpp repacks Q4_K only when the row count is a multiple of 8)")
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, BLOCK_BYTES)
    groups, nb = raw.shape[0] // 8, blocks.shape[1]
    d_dmin = np.ascontiguousarray(blocks[..., :4]).view(np.float16).astype(np.float32)
    packed = blocks[..., 4:16].astype(np.int32)
    scales = np.empty(blocks.shape[:2] + (8,), dtype=np.int32)
    mins = np.empty_like(scales)
    # get_scale_min_k4 (ggml-quants.c): sub-blocks 0-3 in the low 6 bits, 4-7 split over nibbles and top bits
    scales[..., :4], mins[..., :4] = packed[..., 0:4] & 63, packed[..., 4:8] & 63
    scales[..., 4:] = (packed[..., 8:12] & 15) | ((packed[..., 0:4] >> 6) << 4)
    mins[..., 4:] = (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)
    nibbles = blocks[..., 16:].reshape(blocks.shape[:2] + (4, 32))  # 32 bytes hold 64 weights: low, then high
    q = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(groups, 8, nb, 8, 8, 4)
    columns = [np.ascontiguousarray(a.reshape(groups, 8, nb, 8).transpose(0, 2, 3, 1)) for a in (scales, mins)]
    d, dmin = (np.ascontiguousarray(d_dmin[..., i].reshape(groups, 8, nb).transpose(0, 2, 1)) for i in (0, 1))
    return np.ascontiguousarray(q.transpose(0, 2, 3, 4, 1, 5)), *columns, d, dmin


def dpbusd(builder: ir.IRBuilder, start: ir.Value, q: ir.Value, x: ir.Value) -> ir.Value:
    """IR: ``start + lane_sums(q, x)`` (``<8 x i32>``): one ``vpdpbusd`` accumulating on ``start`` with VNNI."""
    if HAS_VNNI:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V8I32, [V8I32] * 3),
                                            "llvm.x86.avx512.vpdpbusd.256")
        return builder.call(fn, [start, builder.bitcast(q, V8I32), builder.bitcast(x, V8I32)])
    return builder.add(start, lane_sums(builder, q, x))


def quad_sums(builder: ir.IRBuilder, q_ptr: ir.Value, x_ptr: ir.Value, q_at: ir.Value, x_at: ir.Value, quad: int,
              start: ir.Value) -> ir.Value:
    """IR: ``start`` + each of 8 outputs' sums of 4 products with activation quad ``quad`` (the 4 bytes at
    ``x_at + 4*quad``, in every lane; the outputs' 4 bytes each at ``q_at + 32*quad``): one ``vpdpbusd``."""
    index = q_at.type
    q_bytes = load_vector(builder, q_ptr, q_at, V32I8, 32 * quad)
    x4 = builder.load(builder.bitcast(builder.gep(x_ptr, [builder.add(x_at, ir.Constant(index, 4 * quad))]),
                                      _I32.as_pointer()), align=1)
    return dpbusd(builder, start, q_bytes, builder.bitcast(splat(builder, x4, V8I32), V32I8))


def _columns_dot(subs_per_fma: int, n_rows: int):
    """An intrinsic: 8 outputs (one column group of ``split_q4_k``, a float lane each, as ggml's repacked kernels
    keep them) of ``n_rows`` consecutive activation rows, one fma pair per ``subs_per_fma`` sub-blocks of 32 (2:
    GEMM rows, 8: GEMV rows), stored to ``out[out0 + i*out_stride:][:8]`` for row ``i``. Each sub-block's sums
    of 32 products come from 8 ``vpdpbusd`` (4 weight bytes of each output against 4 activation bytes in every
    lane); arguments are 1-D arrays with start indices."""

    @intrinsic
    def columns_dot(typingctx, q, q0, sc, mins, sc0, wd, wdmin, wd0, x, x0, xsums, xs0, xd, xd0, out, out0,
                    out_stride, n_blocks):
        def codegen(context, builder, signature, args):
            q_ptr, sc_ptr, min_ptr, wd_ptr, wdmin_ptr, x_ptr, xs_ptr, xd_ptr, out_ptr = (
                data_pointer(context, builder, signature.args[i], args[i]) for i in (0, 2, 3, 5, 6, 8, 10, 12, 14))
            q0, sc0, wd0, x0, xs0, xd0, out0, stride, nb = (args[i] for i in (1, 4, 7, 9, 11, 13, 15, 16, 17))
            index = nb.type
            rows = range(n_rows)
            zero_i = ir.Constant(V8I32, [0] * 8)
            acc = [cgutils.alloca_once_value(builder, ir.Constant(V8F32, None)) for _ in rows]
            acc_min = [cgutils.alloca_once_value(builder, ir.Constant(V8F32, None)) for _ in rows]
            # row i's first activation block, and its first sub-block sum
            x_row = [builder.add(x0, builder.mul(nb, ir.Constant(index, 256 * i))) for i in rows]
            xs_row = [builder.add(xs0, builder.mul(nb, ir.Constant(index, 8 * i))) for i in rows]
            xd_row = [builder.add(xd0, builder.mul(nb, ir.Constant(index, i))) for i in rows]
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                w_d = load_vector(builder, wd_ptr, offset(builder, wd0, b, 8), V8F32)
                w_dmin = load_vector(builder, wdmin_ptr, offset(builder, wd0, b, 8), V8F32)
                x_d = [splat(builder, builder.load(builder.gep(xd_ptr, [builder.add(xd_row[i], b)]))) for i in rows]
                scale = [builder.fmul(w_d, x_d[i]) for i in rows]
                scale_min = [builder.fmul(w_dmin, x_d[i]) for i in rows]
                q_block, sc_block = offset(builder, q0, b, 2048), offset(builder, sc0, b, 64)
                if n_rows == 1:  # a decode step streams every weight once: ask for the bytes ahead
                    for line in range(0, 2048, 64):
                        prefetch(builder, q_ptr, q_block, PREFETCH_BYTES + line)
                x_block = [offset(builder, x_row[i], b, 256) for i in rows]
                xs_block = [offset(builder, xs_row[i], b, 8) for i in rows]
                for first in range(0, 8, subs_per_fma):
                    isum, imin = [zero_i] * n_rows, [zero_i] * n_rows
                    for sub in range(first, first + subs_per_fma):
                        # each row's sums in 4 chains (rows x chains >= 4: vpdpbusd's latency hidden; exact in
                        # any order)
                        chains = max(1, 4 // n_rows)
                        parts = [[zero_i] * chains for _ in rows]
                        for k, quad in enumerate(range(8 * sub, 8 * sub + 8)):
                            for i in rows:
                                parts[i][k % chains] = quad_sums(builder, q_ptr, x_ptr, q_block, x_block[i], quad,
                                                                 parts[i][k % chains])
                        sums = [reduce(builder.add, parts[i]) for i in rows]
                        scales = load_vector(builder, sc_ptr, sc_block, V8I32, 8 * sub)
                        mins_sub = load_vector(builder, min_ptr, sc_block, V8I32, 8 * sub)
                        for i in rows:
                            isum[i] = builder.add(isum[i], builder.mul(sums[i], scales))
                            x_sum = builder.load(builder.gep(xs_ptr, [builder.add(xs_block[i],
                                                                                  ir.Constant(index, sub))]))
                            imin[i] = builder.add(imin[i], builder.mul(mins_sub, splat(builder, x_sum, V8I32)))
                    for i in rows:
                        builder.store(fma_v8(builder, builder.sitofp(isum[i], V8F32), scale[i], builder.load(acc[i])),
                                      acc[i])
                        builder.store(fma_v8(builder, builder.sitofp(imin[i], V8F32), scale_min[i],
                                             builder.load(acc_min[i])), acc_min[i])
            for i in rows:
                at = builder.add(out0, builder.mul(stride, ir.Constant(index, i)))
                builder.store(builder.fsub(builder.load(acc[i]), builder.load(acc_min[i])),
                              builder.bitcast(builder.gep(out_ptr, [at]), V8F32.as_pointer()), align=1)
            return context.get_dummy_value()

        return types.none(q, q0, sc, mins, sc0, wd, wdmin, wd0, x, x0, xsums, xs0, xd, xd0, out, out0, out_stride,
                          n_blocks), codegen

    return columns_dot


_gemm_rows = _columns_dot(subs_per_fma=2, n_rows=4)
_gemv_row = _columns_dot(subs_per_fma=8, n_rows=1)


@njit(cache=True, nogil=True)
def _matmul(wq, wsc, wmin, wd, wdmin, xq, xd, xbsums, n_gemm_rows, out, start, stop):  # pragma: no cover
    # column groups (8 outputs) start..stop; each group's weights stay in L1 while every activation row passes
    nb = wd.shape[1]
    n, n_out = xq.shape[0], out.shape[1]
    q, sc, mins = wq.reshape(-1), wsc.reshape(-1), wmin.reshape(-1)
    wd_flat, wdmin_flat = wd.reshape(-1), wdmin.reshape(-1)
    x, xd_flat, out_flat = xq.reshape(-1), xd.reshape(-1), out.reshape(-1)
    x_sums = np.empty(n * nb * 8, np.int32)  # activation sum of each 32-weight sub-block
    for r in range(n):
        for sub in range(nb * 8):
            b, half = sub >> 3, 2 * (sub & 7)
            x_sums[r * nb * 8 + sub] = np.int32(xbsums[r, b, half]) + np.int32(xbsums[r, b, half + 1])
    for g in range(start, stop):
        for r in range(0, n_gemm_rows, 4):  # ggml's GEMM takes the rows in groups of 4
            _gemm_rows(q, g * nb * 2048, sc, mins, g * nb * 64, wd_flat, wdmin_flat, g * nb * 8, x, r * nb * 256,
                       x_sums, r * nb * 8, xd_flat, r * nb, out_flat, r * n_out + 8 * g, n_out, nb)
        for r in range(n_gemm_rows, n):
            _gemv_row(q, g * nb * 2048, sc, mins, g * nb * 64, wd_flat, wdmin_flat, g * nb * 8, x, r * nb * 256,
                      x_sums, r * nb * 8, xd_flat, r * nb, out_flat, r * n_out + 8 * g, n_out, nb)


@njit(cache=True, parallel=True)
def _matmul_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of column groups per thread (threads.split_rows)
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
    n_out = 8 * d.shape[0]
    out = np.empty((n, n_out), dtype=np.float32)
    args = (q, scales, mins, d, dmin, blocks.qs, blocks.d, blocks.bsums, n - n % 4, out)
    split_rows(_matmul_parallel, _matmul, args, d.shape[0], work=n * blocks.qs[0].size * n_out)
    return out
