"""Prefill's register tile for the 32-block lane kernels (Q8_0, Q5_0, Q4_1 in place; Q4_0, Q5_1, IQ4_NL unpacked):
4 activation rows times ``2 * n_pairs`` weight rows per pass over the blocks, from weight rows decoded once per
tile of outputs into a scratch buffer (``unpack_*``) instead of once per 4 activation rows.

Each output keeps ggml's 8 float lanes and per-block ``acc = fma(d_w*d_x, float(lanes - corr), acc)``, then
``hsum8`` (``lanes``' module docstring), so the bits are those of ``lane_dot``; only where the integers and products
come from changes. A zmm register holds two weight rows' accumulators (8 lanes each) for one activation row: the
scratch keeps the blocks ``b`` of weight rows ``2p`` and ``2p+1`` side by side (64 bytes, one load), the
activation block is broadcast to both halves, and the lane correction ``-corr`` is the ``vpdpbusd`` accumulator's
start (exact integers either way). Per 64 multiply-adds: one ``vpdpbusd``, one convert, one multiply, one fma.
Without AVX512-VNNI LLVM splits each 16-lane vector into two halves (the same arithmetic; fewer pairs per tile).
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from rocmforge.exact.lanes import (HAS_VNNI_512, V8I32, V16F32, V16I32, V32I8, V64I8, Q4_1_BLOCK, Q5_0_BLOCK,
                                   Q8_0_BLOCK, _weight_block, data_pointer, fma_v16, hsum8_ir, lane_sums_pair,
                                   load_vector, offset, splat)

# weight-row pairs per tile: 4 (8 outputs, 16 zmm accumulators) fits AVX-512's 32 registers; 2 for 16 ymm
PAIRS = 4 if HAS_VNNI_512 else 2
TILE_OUTPUTS = 32  # outputs decoded to scratch at once: all activation rows pass over them before the next


def _dpbusd_512(builder: ir.IRBuilder, start: ir.Value, q: ir.Value, x: ir.Value) -> ir.Value:
    """IR: ``start + lane_sums`` of two 32-byte blocks side by side (one zmm ``vpdpbusd`` accumulating on
    ``start`` with AVX512-VNNI)."""
    if HAS_VNNI_512:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V16I32, [V16I32] * 3),
                                            "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [start, builder.bitcast(q, V16I32), builder.bitcast(x, V16I32)])
    return builder.add(start, lane_sums_pair(builder, q, x))


@intrinsic
def tile_dot(typingctx, w, w0, ws, ws0, x, x0, xd, xd0, ncorr, nc0, out, out0, out_stride, n_blocks, n_pairs):
    """``out[out0 + i*out_stride + j] = hsum8(lanes of activation row i, weight row j)`` for 4 rows (one
    ``interleave4`` group: ``x`` int8 at ``x0`` ``[nb, 4, 32]``, ``xd`` float32 ``[nb, 4]``, ``ncorr`` int32
    ``[nb, 4, 8]``: minus each lane's correction, zeros for a layout without one) and ``2 * n_pairs`` weight rows
    (a constant) from the ``unpack_*`` scratch (``w`` uint8 from ``w0``: ``[pair, nb, 2, 32]``, ``ws`` float32
    scales from ``ws0``: ``[pair, nb, 2]``)."""
    if not isinstance(n_pairs, types.IntegerLiteral):
        return None
    pairs = n_pairs.literal_value

    def codegen(context, builder, signature, args):
        w_ptr, ws_ptr, x_ptr, xd_ptr, nc_ptr, out_ptr = (data_pointer(context, builder, signature.args[i], args[i])
                                                         for i in (0, 2, 4, 6, 8, 10))
        w0, ws0, x0, xd0, nc0, out0, stride, nb = (args[i] for i in (1, 3, 5, 7, 9, 11, 12, 13))
        index = nb.type
        both_halves = ir.Constant(ir.VectorType(ir.IntType(32), 64), list(range(32)) * 2)
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(V16F32, None)) for _ in range(pairs)]
                for _ in range(4)]
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            w_bytes, w_scale = [], []
            for p in range(pairs):
                pb = builder.add(builder.mul(nb, ir.Constant(index, p)), b)  # pair p's block b
                w_bytes.append(load_vector(builder, w_ptr, offset(builder, w0, pb, 64), V64I8))
                two = load_vector(builder, ws_ptr, offset(builder, ws0, pb, 2), ir.VectorType(ir.FloatType(), 2))
                w_scale.append(builder.shuffle_vector(two, two, ir.Constant(V16I32, [0] * 8 + [1] * 8)))
            for i in range(4):
                x32 = load_vector(builder, x_ptr, builder.add(offset(builder, x0, b, 128), ir.Constant(index, 32 * i)),
                                  V32I8)
                x64 = builder.shuffle_vector(x32, x32, both_halves)
                nc8 = load_vector(builder, nc_ptr, builder.add(offset(builder, nc0, b, 32), ir.Constant(index, 8 * i)),
                                  V8I32)
                nc16 = builder.shuffle_vector(nc8, nc8, ir.Constant(V16I32, list(range(8)) * 2))
                x_d = splat(builder, builder.load(builder.gep(xd_ptr, [builder.add(offset(builder, xd0, b, 4),
                                                                                     ir.Constant(index, i))])),
                            V16F32)
                for p in range(pairs):
                    lanes = _dpbusd_512(builder, nc16, w_bytes[p], x64)
                    scale = builder.fmul(w_scale[p], x_d)  # d_w * d_x, ggml's float32 product
                    acc = accs[i][p]
                    builder.store(fma_v16(builder, scale, builder.sitofp(lanes, V16F32), builder.load(acc)), acc)
        for i in range(4):
            row = builder.add(out0, builder.mul(stride, ir.Constant(index, i)))
            for p in range(pairs):
                value = builder.load(accs[i][p])
                for half in range(2):
                    half_lanes = ir.Constant(V8I32, list(range(8 * half, 8 * half + 8)))
                    lanes = builder.shuffle_vector(value, value, half_lanes)
                    builder.store(hsum8_ir(builder, lanes),
                                  builder.gep(out_ptr, [builder.add(row, ir.Constant(index, 2 * p + half))]))
        return context.get_dummy_value()

    return types.none(w, w0, ws, ws0, x, x0, xd, xd0, ncorr, nc0, out, out0, out_stride, n_blocks, n_pairs), codegen


def _unpack_block(layout):
    @intrinsic
    def unpack(typingctx, raw, raw0, block, w, w0, ws, ws0):
        """Block ``block`` of the raw weight row at byte ``raw0`` -> its 32 unsigned bytes at ``w[w0:]`` and its
        float32 scale at ``ws[ws0]``."""
        def codegen(context, builder, signature, args):
            raw_ptr, w_ptr, ws_ptr = (data_pointer(context, builder, signature.args[i], args[i]) for i in (0, 3, 5))
            q_bytes, scale = _weight_block(builder, layout, [raw_ptr, args[1]], args[2])
            builder.store(q_bytes, builder.bitcast(builder.gep(w_ptr, [args[4]]), V32I8.as_pointer()), align=1)
            builder.store(scale, builder.gep(ws_ptr, [args[6]]))
            return context.get_dummy_value()

        return types.none(raw, raw0, block, w, w0, ws, ws0), codegen

    return unpack


unpack_q8_0, unpack_q5_0, unpack_q4_1 = (_unpack_block(layout) for layout in (Q8_0_BLOCK, Q5_0_BLOCK, Q4_1_BLOCK))


@njit(cache=True, nogil=True)
def byte_slot(j, nb, b):  # pragma: no cover - compiled
    """Where block ``b`` of the tile's weight row ``j`` goes in the byte scratch (its scale: the
    same divided by 32)."""
    return ((j >> 1) * nb + b) * 64 + (j & 1) * 32


@njit(cache=True, nogil=True)
def tile_rows(w, ws, n_tile, nb, xi, xdi, ncorri, out, o0):  # pragma: no cover - compiled
    """Every ``interleave4`` group of activation rows times the ``n_tile`` weight rows in scratch (``w``, ``ws``),
    into ``out[:, o0:]``; returns how many outputs it did (all but an odd last one)."""
    n_out = out.shape[1]
    xi_flat, xdi_flat, nc_flat, out_flat = xi.reshape(-1), xdi.reshape(-1), ncorri.reshape(-1), out.reshape(-1)
    full = n_tile // (2 * PAIRS) * (2 * PAIRS)
    for g in range(xi.shape[0]):
        first = 4 * g * n_out + o0
        for j in range(0, full, 2 * PAIRS):
            if PAIRS == 4:
                tile_dot(w, (j >> 1) * nb * 64, ws, (j >> 1) * nb * 2, xi_flat, g * nb * 128, xdi_flat, g * nb * 4,
                         nc_flat, g * nb * 32, out_flat, first + j, n_out, nb, 4)
            else:
                tile_dot(w, (j >> 1) * nb * 64, ws, (j >> 1) * nb * 2, xi_flat, g * nb * 128, xdi_flat, g * nb * 4,
                         nc_flat, g * nb * 32, out_flat, first + j, n_out, nb, 2)
        for j in range(full, n_tile - 1, 2):
            tile_dot(w, (j >> 1) * nb * 64, ws, (j >> 1) * nb * 2, xi_flat, g * nb * 128, xdi_flat, g * nb * 4,
                     nc_flat, g * nb * 32, out_flat, first + j, n_out, nb, 1)
    return n_tile - n_tile % 2
