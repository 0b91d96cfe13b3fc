"""The matmul shared by the K-quants without an x86 repack (Q2_K, Q3_K, Q5_K): ggml's integer lanes per 256-weight
super-block, then the type's float steps, for either of the two kernels llama.cpp's x86 CPU backend picks by the
number of activation rows ``n``:

- ``n < 8``: ``ggml_vec_dot_<type>_q8_K`` (arch/x86/quants.c, AVX2). Per super-block 8 int32 lanes, lane ``l``
  the sum over the eight 32-weight chunks of ``scale * sum_{i<4} q[32c+4l+i] * x[32c+4l+i]`` (``maddubs`` +
  ``madd``; lanes 0-3 take the chunk's first 16-weight scale, 4-7 its second), ``acc = fma(d_x*d_w, lane, acc)``;
  the mins: Q2_K ``acc = fma(-d_x*dmin_w, mins[2l]*bsums[2l] + mins[2l+1]*bsums[2l+1], acc)`` first, Q5_K one
  scalar ``summs = fma(-d_x*dmin_w, sum mins*bsums, summs)`` added after ``hsum8(acc)``.
- ``n >= 8``: the tiled K-quant matmul (ggml-cpu/tiled, ``tiled_run_microtile_avx2``'s epilogue): per super-block
  the exact integers ``s1 = sum scale*q*x`` and ``s2 = sum mins*bsums``, ``res = d_w * s1``, then
  ``res = fma(-dmin_w, s2, res)`` for types with mins, ``acc = fma(res, d_x, acc)``.

A prepared weight (``KQuantWeight``) holds each weight as an unsigned byte code ``q`` (natural order), a signed
scale per 16 weights (Q5_K's per-32 scales twice), the same for the mins, and the float32 ``d``/``dmin``. Codes
carry a ``bias`` (Q3_K: 4) that the lanes take back exactly: ``q*x - bias*x`` per lane.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from rocmforge.exact.lanes import (OUT_TILE, V8F32, V8I32, V32I8, data_pointer, fma_f32, fma_v8, hsum8_ir, lane_sums,
                                   load_vector, offset, reduce_add, splat)
from rocmforge.exact.q8_k_activations import Q8KBlocks, quantize_q8_k
from rocmforge.exact.threads import split_rows

TILED_MIN_ROWS = 8  # ggml_tiled_min_batch: from 8 rows on, the tiled kernel
# how a type's mins enter ggml's vec_dot: none (Q3_K), per lane pair (Q2_K), one scalar sum (Q5_K)
NO_MINS, LANE_MINS, SCALAR_MINS = 0, 1, 2


class KQuantWeight(NamedTuple):
    """``q`` uint8 ``[out, nb, 256]``, ``scales``/``mins`` int8 ``[out, nb, 16]``, ``d``/``dmin`` float32
    ``[out, nb]``; ``bias``: subtracted from every code; ``mins_kind``: NO_MINS, LANE_MINS or SCALAR_MINS."""

    q: np.ndarray
    scales: np.ndarray
    mins: np.ndarray
    d: np.ndarray
    dmin: np.ndarray
    bias: int
    mins_kind: int


def _row_dot(tiled: bool, mins_kind: int, bias: int):
    """An intrinsic: one output's dot over ``n_blocks`` super-blocks (1-D arrays with start indices), ggml's
    vec_dot lanes (``tiled=False``) or the tiled kernel's epilogue. A float32."""
    v16i32 = ir.VectorType(ir.IntType(32), 16)
    v16i8 = ir.VectorType(ir.IntType(8), 16)

    @intrinsic
    def row_dot(typingctx, q, q0, sc, mn, s0, wd, wdm, wd0, x, x0, bsums, bs0, xd, xd0, n_blocks):
        def codegen(context, builder, signature, args):
            q_ptr, sc_ptr, mn_ptr, wd_ptr, wdm_ptr, x_ptr, bs_ptr, xd_ptr = (
                data_pointer(context, builder, signature.args[i], args[i]) for i in (0, 2, 3, 5, 6, 8, 10, 12))
            q0, s0, wd0, x0, bs0, xd0, n = (args[i] for i in (1, 4, 7, 9, 11, 13, 14))
            f32 = ir.FloatType()
            even_odd = [ir.Constant(V8I32, [2 * i + k for i in range(8)]) for k in (0, 1)]
            acc = cgutils.alloca_once_value(builder, ir.Constant(f32 if tiled else V8F32, None))
            summs = cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0))
            bias_bytes = ir.Constant(V32I8, [bias] * 32)
            with cgutils.for_range(builder, n) as loop:
                b = loop.index
                scales = builder.sext(load_vector(builder, sc_ptr, offset(builder, s0, b, 16), v16i8), v16i32)
                lanes = ir.Constant(V8I32, [0] * 8)
                q_block, x_block = offset(builder, q0, b, 256), offset(builder, x0, b, 256)
                for m in range(8):  # 32-weight chunk m: lanes 0-3 take scale 2m, lanes 4-7 scale 2m+1
                    x_bytes = load_vector(builder, x_ptr, x_block, V32I8, 32 * m)
                    sums = lane_sums(builder, load_vector(builder, q_ptr, q_block, V32I8, 32 * m), x_bytes)
                    if bias:
                        sums = builder.sub(sums, lane_sums(builder, bias_bytes, x_bytes))
                    chunk_scales = builder.shuffle_vector(scales, scales,
                                                          ir.Constant(V8I32, [2 * m] * 4 + [2 * m + 1] * 4))
                    lanes = builder.add(lanes, builder.mul(sums, chunk_scales))
                w_d = builder.load(builder.gep(wd_ptr, [builder.add(wd0, b)]))
                x_d = builder.load(builder.gep(xd_ptr, [builder.add(xd0, b)]))
                if mins_kind != NO_MINS:
                    mins = builder.sext(load_vector(builder, mn_ptr, offset(builder, s0, b, 16), v16i8), v16i32)
                    pairs = builder.mul(mins, load_vector(builder, bs_ptr, offset(builder, bs0, b, 16), v16i32))
                    w_dmin = builder.load(builder.gep(wdm_ptr, [builder.add(wd0, b)]))
                if tiled:
                    res = builder.fmul(w_d, builder.sitofp(reduce_add(builder, lanes), f32))
                    if mins_kind != NO_MINS:
                        res = fma_f32(builder, builder.fneg(w_dmin), builder.sitofp(reduce_add(builder, pairs), f32),
                                      res)
                    builder.store(fma_f32(builder, res, x_d, builder.load(acc)), acc)
                else:
                    minus_dmin = builder.fneg(builder.fmul(x_d, w_dmin)) if mins_kind != NO_MINS else None
                    if mins_kind == LANE_MINS:  # Q2_K: the mins first, lane l taking sub-blocks 2l and 2l+1
                        min_lanes = builder.add(*(builder.shuffle_vector(pairs, pairs, m) for m in even_odd))
                        builder.store(fma_v8(builder, splat(builder, minus_dmin), builder.sitofp(min_lanes, V8F32),
                                             builder.load(acc)), acc)
                    elif mins_kind == SCALAR_MINS:
                        builder.store(fma_f32(builder, minus_dmin, builder.sitofp(reduce_add(builder, pairs), f32),
                                              builder.load(summs)), summs)
                    d = splat(builder, builder.fmul(x_d, w_d))
                    builder.store(fma_v8(builder, d, builder.sitofp(lanes, V8F32), builder.load(acc)), acc)
            if tiled:
                return builder.load(acc)
            total = hsum8_ir(builder, builder.load(acc))
            return builder.fadd(total, builder.load(summs)) if mins_kind == SCALAR_MINS else total

        return types.float32(q, q0, sc, mn, s0, wd, wdm, wd0, x, x0, bsums, bs0, xd, xd0, n_blocks), codegen

    return row_dot


# one intrinsic per (kernel, mins, bias) that a type uses: Q2_K, Q3_K, Q5_K
_DOTS = {(tiled, kind, bias): _row_dot(tiled, kind, bias)
         for tiled in (False, True) for kind, bias in ((LANE_MINS, 0), (NO_MINS, 4), (SCALAR_MINS, 0))}
_vec_q2_k, _tiled_q2_k = _DOTS[False, LANE_MINS, 0], _DOTS[True, LANE_MINS, 0]
_vec_q3_k, _tiled_q3_k = _DOTS[False, NO_MINS, 4], _DOTS[True, NO_MINS, 4]
_vec_q5_k, _tiled_q5_k = _DOTS[False, SCALAR_MINS, 0], _DOTS[True, SCALAR_MINS, 0]


@njit(cache=True, nogil=True)
def _matmul(wq, wsc, wmn, wd, wdm, kind, xq, xd, xbsums, tiled, out, start, stop):  # pragma: no cover - compiled
    # output rows start..stop, OUT_TILE at a time (their weight rows stay in L1 while all activation rows pass)
    nb = wd.shape[1]
    q, sc, mn, wd_flat, wdm_flat = wq.reshape(-1), wsc.reshape(-1), wmn.reshape(-1), wd.reshape(-1), wdm.reshape(-1)
    x, xd_flat, bsums = xq.reshape(-1), xd.reshape(-1), xbsums.reshape(-1)
    for o0 in range(start, stop, OUT_TILE):
        for r in range(xq.shape[0]):
            for o in range(o0, min(o0 + OUT_TILE, stop)):
                a = (q, o * nb * 256, sc, mn, o * nb * 16, wd_flat, wdm_flat, o * nb, x, r * nb * 256, bsums,
                     r * nb * 16, xd_flat, r * nb, nb)
                if kind == 0:
                    out[r, o] = _tiled_q2_k(*a) if tiled else _vec_q2_k(*a)
                elif kind == 1:
                    out[r, o] = _tiled_q3_k(*a) if tiled else _vec_q3_k(*a)
                else:
                    out[r, o] = _tiled_q5_k(*a) if tiled else _vec_q5_k(*a)


@njit(cache=True, parallel=True)
def _matmul_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of output rows per thread (threads.split_rows)
        _matmul(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)


_KIND = {(LANE_MINS, 0): 0, (NO_MINS, 4): 1, (SCALAR_MINS, 0): 2}


def matmul_k_quant(x: np.ndarray | Q8KBlocks, weight: KQuantWeight) -> np.ndarray:
    """float32 ``x`` ``[n, k]`` (or its Q8_K blocks) times a prepared K-quant weight ``[out, k]``: ``[n, out]``."""
    blocks = x if isinstance(x, Q8KBlocks) else quantize_q8_k(x)
    n, n_out = blocks.qs.shape[0], weight.d.shape[0]
    out = np.empty((n, n_out), dtype=np.float32)
    args = (weight.q, weight.scales, weight.mins, weight.d, weight.dmin, _KIND[weight.mins_kind, weight.bias],
            blocks.qs, blocks.d, blocks.bsums, n >= TILED_MIN_ROWS, out)
    split_rows(_matmul_parallel, _matmul, args, n_out, work=n * n_out * weight.q[0].size)
    return out
