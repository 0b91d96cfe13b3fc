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
[0, 64). Each 32-element chunk's lanes come from ``lanes.lane_sums`` (one ``vpdpbusd``), times its two scales.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from rocmforge.exact.lanes import (OUT_TILE, V8F32, V8I32, V32I8, data_pointer, fma_f32, fma_v8, hsum8_ir, lane_sums,
                                   load_vector, offset, reduce_add, splat)
from rocmforge.exact.q8_k_activations import Q8KBlocks, quantize_q8_k
from rocmforge.exact.threads import split_rows

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


def _row_dot(tiled: bool, n_rows: int):
    """An intrinsic: one output's dot over ``n_blocks`` super-blocks for ``n_rows`` consecutive activation rows
    (each weight chunk loaded once for all), ggml's lanes (``tiled=False``) or the tiled kernel's one fma per
    super-block; arguments are 1-D arrays with start indices. A float32, or a tuple per row."""

    @intrinsic
    def row_dot(typingctx, q, q0, sc, sc0, wd, wd0, x, x0, bsums, bsums0, xd, xd0, n_blocks):
        def codegen(context, builder, signature, args):
            q_ptr, sc_ptr, wd_ptr, x_ptr, bs_ptr, xd_ptr = (data_pointer(context, builder, signature.args[i], args[i])
                                                            for i in range(0, 12, 2))
            q0, sc0, wd0, x0, bs0, xd0 = args[1:12:2]
            n = args[12]
            rows = range(n_rows)
            v16i32 = ir.VectorType(ir.IntType(32), 16)
            even_odd = [ir.Constant(V8I32, [2 * i + k for i in range(8)]) for k in (0, 1)]
            acc = [cgutils.alloca_once_value(builder, ir.Constant(V8F32 if not tiled else ir.FloatType(), None))
                   for _ in rows]
            with cgutils.for_range(builder, n) as loop:
                b = loop.index
                rb = [builder.add(builder.mul(n, ir.Constant(n.type, r)), b) for r in rows]  # block b of row r
                scales = builder.sext(load_vector(builder, sc_ptr, offset(builder, sc0, b, 16),
                                                  ir.VectorType(ir.IntType(8), 16)), v16i32)
                lanes = []
                for r in rows:
                    pairs = builder.mul(scales, load_vector(builder, bs_ptr, offset(builder, bs0, rb[r], 16), v16i32))
                    # lane l takes back 32 * (bsums[2l]*scales[2l] + bsums[2l+1]*scales[2l+1])
                    minus = builder.shl(builder.add(*(builder.shuffle_vector(pairs, pairs, m) for m in even_odd)),
                                        ir.Constant(V8I32, [5] * 8))
                    lanes.append(builder.sub(ir.Constant(V8I32, [0] * 8), minus))
                q_block = offset(builder, q0, b, 256)
                for m in range(8):  # 32-element chunk m: lanes 0-3 take scale 2m, lanes 4-7 scale 2m+1
                    q_bytes = load_vector(builder, q_ptr, q_block, V32I8, 32 * m)
                    chunk_scales = builder.shuffle_vector(scales, scales,
                                                          ir.Constant(V8I32, [2 * m] * 4 + [2 * m + 1] * 4))
                    for r in rows:
                        x_bytes = load_vector(builder, x_ptr, offset(builder, x0, rb[r], 256), V32I8, 32 * m)
                        lanes[r] = builder.add(lanes[r], builder.mul(lane_sums(builder, q_bytes, x_bytes),
                                                                     chunk_scales))
                w_d = builder.load(builder.gep(wd_ptr, [builder.add(wd0, b)]))
                for r in rows:
                    x_d = builder.load(builder.gep(xd_ptr, [builder.add(xd0, rb[r])]))
                    if tiled:
                        block = builder.fmul(w_d, builder.sitofp(reduce_add(builder, lanes[r]), ir.FloatType()))
                        builder.store(fma_f32(builder, block, x_d, builder.load(acc[r])), acc[r])
                    else:
                        d = splat(builder, builder.fmul(x_d, w_d))
                        builder.store(fma_v8(builder, d, builder.sitofp(lanes[r], V8F32), builder.load(acc[r])),
                                      acc[r])
            results = [builder.load(a) if tiled else hsum8_ir(builder, builder.load(a)) for a in acc]
            return results[0] if n_rows == 1 else context.make_tuple(builder, signature.return_type, results)

        result = types.float32 if n_rows == 1 else types.UniTuple(types.float32, n_rows)
        return result(q, q0, sc, sc0, wd, wd0, x, x0, bsums, bsums0, xd, xd0, n_blocks), codegen

    return row_dot


_vec_dot_row = _row_dot(tiled=False, n_rows=1)
_tiled_row = _row_dot(tiled=True, n_rows=1)
_tiled_rows = _row_dot(tiled=True, n_rows=4)


@njit(cache=True, nogil=True)
def _matmul(wq, wsc, wd, xq, xd, xbsums, tiled, out, start, stop):  # pragma: no cover - compiled
    # output rows start..stop
    nb = wd.shape[1]
    n = xq.shape[0]
    q, sc, wd_flat = wq.reshape(-1), wsc.reshape(-1), wd.reshape(-1)
    x, xd_flat, bsums = xq.reshape(-1), xd.reshape(-1), xbsums.reshape(-1)
    for o0 in range(start, stop, OUT_TILE):  # OUT_TILE weight rows stay in L1 while all activation rows pass
        o1 = min(o0 + OUT_TILE, stop)
        if not tiled:
            for r in range(n):
                for o in range(o0, o1):
                    out[r, o] = _vec_dot_row(q, o * nb * 256, sc, o * nb * 16, wd_flat, o * nb, x, r * nb * 256,
                                             bsums, r * nb * 16, xd_flat, r * nb, nb)
            continue
        for r in range(0, n - n % 4, 4):  # four activation rows per pass over a weight row
            for o in range(o0, o1):
                out[r, o], out[r + 1, o], out[r + 2, o], out[r + 3, o] = _tiled_rows(
                    q, o * nb * 256, sc, o * nb * 16, wd_flat, o * nb, x, r * nb * 256, bsums, r * nb * 16, xd_flat,
                    r * nb, nb)
        for r in range(n - n % 4, n):
            for o in range(o0, o1):
                out[r, o] = _tiled_row(q, o * nb * 256, sc, o * nb * 16, wd_flat, o * nb, x, r * nb * 256, bsums,
                                       r * nb * 16, xd_flat, r * nb, nb)


@njit(cache=True, parallel=True)
def _matmul_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of output rows per thread (threads.split_rows)
        _matmul(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)


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
    n, n_out = blocks.qs.shape[0], wd.shape[0]
    out = np.empty((n, n_out), dtype=np.float32)
    tiled = n >= TILED_MIN_ROWS
    split_rows(_matmul_parallel, _matmul, (wq, wsc, wd, blocks.qs, blocks.d, blocks.bsums, tiled, out), n_out,
               work=n * n_out * wq[0].size)
    return out
