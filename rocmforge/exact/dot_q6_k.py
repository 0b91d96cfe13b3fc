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
[0, 64). The weight is kept in column groups of 8 outputs, a vector lane each (``Q6KColumns``): one ``vpdpbusd``
gives 8 outputs' sums of 4 products (exact int32), and vec_dot's 8 lanes of an output become 8 vectors.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from rocmforge.exact.dot_q4_k import quad_sums
from rocmforge.exact.lanes import (PREFETCH_BYTES, V8F32, V8I32, V16I32, data_pointer, fma_v8, load_vector, offset,
                                   prefetch, splat)
from rocmforge.exact.q8_k_activations import Q8KBlocks, quantize_q8_k
from rocmforge.exact.threads import split_rows

_I32 = ir.IntType(32)
BLOCK_BYTES = 210
TILED_MIN_ROWS = 8  # ggml_tiled_min_batch: from 8 rows on, the tiled kernel


class Q6KColumns(NamedTuple):
    """A Q6_K weight in column groups of 8 outputs (``g = ceil(out / 8)``, the last padded with zero weights),
    a lane per output: ``q`` uint8 in [0, 64) ``[g, nb, 64 quads, 8 outputs, 4]`` (each output's 4 consecutive
    weights side by side: one ``vpdpbusd`` operand), ``scales`` int32 ``[g, nb, 16, 8 outputs]`` (one per 16
    weights), ``d`` float32 ``[g, nb, 8 outputs]``, ``n_out`` the real output count."""

    q: np.ndarray
    scales: np.ndarray
    d: np.ndarray
    n_out: int


def split_q6_k(raw: np.ndarray) -> Q6KColumns:
    """Raw Q6_K rows ``[out, bytes]`` -> ``Q6KColumns``.

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import dequantize
    >>> raw = np.random.default_rng(0).integers(0, 256, (2, BLOCK_BYTES), dtype=np.uint8)
    >>> raw[:, 208:] = np.array([0.01], np.float16).view(np.uint8)
    >>> q, scales, d, n_out = split_q6_k(raw)
    >>> q_rows = q.transpose(0, 3, 1, 2, 4).reshape(8, 1, 16, 16)[:n_out]  # back to [out, nb, 16 sub-blocks, 16]
    >>> w = (d.transpose(0, 2, 1).reshape(8, 1, 1)[:n_out] * scales.transpose(0, 3, 1, 2).reshape(8, 1, 16)[:n_out])
    >>> w = w[..., None] * (q_rows - 32.0)
    >>> bool(np.array_equal(w.reshape(2, 256), dequantize(raw, T.Q6_K)))
    True
    """
    n_out = raw.shape[0]
    groups = -(-n_out // 8)
    blocks = np.zeros((8 * groups, raw.shape[1] // BLOCK_BYTES, BLOCK_BYTES), np.uint8)
    blocks[:n_out] = np.asarray(raw).reshape(n_out, -1, BLOCK_BYTES)
    nb = blocks.shape[1]
    ql, qh = blocks[..., :128], blocks[..., 128:192]
    scales = blocks[..., 192:208].view(np.int8).astype(np.int32)
    d = np.ascontiguousarray(blocks[..., 208:]).view(np.float16)[..., 0].astype(np.float32)
    q = np.empty(blocks.shape[:2] + (256,), dtype=np.uint8)
    for half in range(2):  # 128 weights from ql[64h:64h+64] and qh[32h:32h+32]
        low, high, out = ql[..., 64 * half:64 * half + 64], qh[..., 32 * half:32 * half + 32], 128 * half
        q[..., out:out + 32] = (low[..., :32] & 15) | ((high & 3) << 4)
        q[..., out + 32:out + 64] = (low[..., 32:] & 15) | (((high >> 2) & 3) << 4)
        q[..., out + 64:out + 96] = (low[..., :32] >> 4) | (((high >> 4) & 3) << 4)
        q[..., out + 96:out + 128] = (low[..., 32:] >> 4) | (((high >> 6) & 3) << 4)
    q = q.reshape(groups, 8, nb, 64, 4).transpose(0, 2, 3, 1, 4)
    scales = scales.reshape(groups, 8, nb, 16).transpose(0, 2, 3, 1)
    d = d.reshape(groups, 8, nb).transpose(0, 2, 1)
    return Q6KColumns(*(np.ascontiguousarray(a) for a in (q, scales, d)), n_out)


def _columns_dot(tiled: bool, n_rows: int):
    """An intrinsic: 8 outputs (one column group, a lane each) of ``n_rows`` consecutive activation rows, stored to
    ``out[out0 + i*out_stride:][:8]`` for row ``i``: ggml's vec_dot lanes (``tiled=False``, one row), kept as 8
    accumulator vectors (vector ``l`` = lane ``l`` of every output) and summed by ``hsum8``'s tree at the end, or the
    tiled kernel's whole-block integer and one fma per super-block. Arguments are 1-D arrays with start indices."""

    @intrinsic
    def columns_dot(typingctx, q, q0, sc, sc0, wd, wd0, x, x0, bsums, bs0, xd, xd0, out, out0, out_stride, n_blocks):
        def codegen(context, builder, signature, args):
            q_ptr, sc_ptr, wd_ptr, x_ptr, bs_ptr, xd_ptr, out_ptr = (
                data_pointer(context, builder, signature.args[i], args[i]) for i in range(0, 14, 2))
            q0, sc0, wd0, x0, bs0, xd0, out0 = args[1:14:2]
            stride, nb = args[14], args[15]
            index = nb.type
            rows = range(n_rows)
            zero_i = ir.Constant(V8I32, [0] * 8)
            n_acc = 1 if tiled else 8
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(V8F32, None)) for _ in range(n_acc)] for _ in rows]
            x_row = [builder.add(x0, builder.mul(nb, ir.Constant(index, 256 * i))) for i in rows]
            bs_row = [builder.add(bs0, builder.mul(nb, ir.Constant(index, 16 * i))) for i in rows]
            xd_row = [builder.add(xd0, builder.mul(nb, ir.Constant(index, i))) for i in rows]
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                q_block, sc_block = offset(builder, q0, b, 2048), offset(builder, sc0, b, 128)
                if not tiled:  # a decode step streams every weight once: ask for the bytes ahead
                    for line in range(0, 2048, 64):
                        prefetch(builder, q_ptr, q_block, PREFETCH_BYTES + line)
                x_block = [offset(builder, x_row[i], b, 256) for i in rows]
                bsums = [load_vector(builder, bs_ptr, offset(builder, bs_row[i], b, 16), V16I32) for i in rows]
                scales = [load_vector(builder, sc_ptr, sc_block, V8I32, 8 * sub) for sub in range(16)]
                w_d = load_vector(builder, wd_ptr, offset(builder, wd0, b, 8), V8F32)
                x_d = [builder.load(builder.gep(xd_ptr, [builder.add(xd_row[i], b)])) for i in rows]
                if tiled:
                    total = [zero_i] * n_rows
                    for sub in range(16):
                        sums = [zero_i] * n_rows
                        for quad in range(4 * sub, 4 * sub + 4):
                            sums = [quad_sums(builder, q_ptr, x_ptr, q_block, x_block[i], quad, sums[i]) for i in rows]
                        for i in rows:  # scale * (sum q*x - 32 * sum x): the weights are q - 32
                            x_sum = builder.extract_element(bsums[i], ir.Constant(_I32, sub))
                            minus = splat(builder, builder.shl(x_sum, ir.Constant(_I32, 5)), V8I32)
                            total[i] = builder.add(total[i], builder.mul(builder.sub(sums[i], minus), scales[sub]))
                    for i in rows:
                        block = builder.fmul(w_d, builder.sitofp(total[i], V8F32))
                        builder.store(fma_v8(builder, block, splat(builder, x_d[i]), builder.load(acc[i][0])),
                                      acc[i][0])
                else:
                    # lane l: quads 8c + l of each 32-weight chunk c, times the scale of their 16-weight half; it
                    # takes back 32 * (bsums[2l]*scales[2l] + bsums[2l+1]*scales[2l+1])
                    d = builder.fmul(splat(builder, x_d[0]), w_d)
                    for lane in range(8):
                        total = None
                        for half in (2 * lane, 2 * lane + 1):
                            x_sum = builder.shl(builder.extract_element(bsums[0], ir.Constant(_I32, half)),
                                                ir.Constant(_I32, 5))
                            term = builder.mul(scales[half], splat(builder, x_sum, V8I32))
                            total = term if total is None else builder.add(total, term)
                        total = builder.sub(zero_i, total)
                        for chunk in range(8):
                            quad = 8 * chunk + lane
                            sums = quad_sums(builder, q_ptr, x_ptr, q_block, x_block[0], quad, zero_i)
                            total = builder.add(total, builder.mul(sums, scales[2 * chunk + lane // 4]))
                        builder.store(fma_v8(builder, d, builder.sitofp(total, V8F32), builder.load(acc[0][lane])),
                                      acc[0][lane])
            for i in rows:
                if tiled:
                    result = builder.load(acc[i][0])
                else:  # hsum8: ((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7)), every output at once
                    a = [builder.load(v) for v in acc[i]]
                    t = [builder.fadd(a[k], a[k + 4]) for k in range(4)]
                    result = builder.fadd(builder.fadd(t[0], t[2]), builder.fadd(t[1], t[3]))
                at = builder.add(out0, builder.mul(stride, ir.Constant(index, i)))
                builder.store(result, builder.bitcast(builder.gep(out_ptr, [at]), V8F32.as_pointer()), align=1)
            return context.get_dummy_value()

        return types.none(q, q0, sc, sc0, wd, wd0, x, x0, bsums, bs0, xd, xd0, out, out0, out_stride,
                          n_blocks), codegen

    return columns_dot


_vec_dot_row = _columns_dot(tiled=False, n_rows=1)
_tiled_row = _columns_dot(tiled=True, n_rows=1)
_tiled_rows = _columns_dot(tiled=True, n_rows=4)


@njit(cache=True, nogil=True)
def _matmul(wq, wsc, wd, xq, xd, xbsums, tiled, out, start, stop):  # pragma: no cover - compiled
    # column groups (8 outputs) start..stop; each group's weights stay in L1 while every activation row passes
    nb = wd.shape[1]
    n, n_out = xq.shape[0], out.shape[1]
    q, sc, wd_flat = wq.reshape(-1), wsc.reshape(-1), wd.reshape(-1)
    x, xd_flat, bsums, out_flat = xq.reshape(-1), xd.reshape(-1), xbsums.reshape(-1), out.reshape(-1)
    for g in range(start, stop):
        w0, s0, d0 = g * nb * 2048, g * nb * 128, g * nb * 8
        if not tiled:
            for r in range(n):
                _vec_dot_row(q, w0, sc, s0, wd_flat, d0, x, r * nb * 256, bsums, r * nb * 16, xd_flat, r * nb,
                             out_flat, r * n_out + 8 * g, n_out, nb)
            continue
        for r in range(0, n - n % 4, 4):  # four activation rows per pass over the group's weights
            _tiled_rows(q, w0, sc, s0, wd_flat, d0, x, r * nb * 256, bsums, r * nb * 16, xd_flat, r * nb,
                        out_flat, r * n_out + 8 * g, n_out, nb)
        for r in range(n - n % 4, n):
            _tiled_row(q, w0, sc, s0, wd_flat, d0, x, r * nb * 256, bsums, r * nb * 16, xd_flat, r * nb,
                       out_flat, r * n_out + 8 * g, n_out, nb)


@njit(cache=True, parallel=True)
def _matmul_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of column groups per thread (threads.split_rows)
        _matmul(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)


def matmul_q6_k(x: np.ndarray | Q8KBlocks, weight: Q6KColumns) -> np.ndarray:
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
    groups = weight.d.shape[0]
    n = blocks.qs.shape[0]
    out = np.empty((n, 8 * groups), dtype=np.float32)
    tiled = n >= TILED_MIN_ROWS
    split_rows(_matmul_parallel, _matmul, (weight.q, weight.scales, weight.d, blocks.qs, blocks.d, blocks.bsums,
                                           tiled, out), groups, work=n * 8 * groups * blocks.qs[0].size)
    return out if weight.n_out == out.shape[1] else np.ascontiguousarray(out[:, :weight.n_out])
