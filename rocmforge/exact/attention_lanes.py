"""The inner loops of prefill attention as LLVM vector code, for ``attention._attention``: many keys at once, each
output still in ggml's own operation order (the softmax's exponentials: ``expf_lanes.exp_8``).

- ``kq_32`` -- ``ggml_vec_dot_f32`` of one query with 32 keys, the keys in the SIMD lanes: key ``j``'s dot is
  ggml's 4 accumulators x 8 lanes, each a chain of fmas over steps of 32 elements, reduced by
  ``GGML_F32x8_REDUCE``; here chain ``(a, l)`` of 16 keys is one ``<16 x float>`` register fed by the transposed
  keys, and the reduction is the same adds done vertically. (ggml runs one key at a time and reduces
  horizontally.)
- ``kqv_lane`` -- lane ``l`` of tinyBLAS's ``kqv = v . p`` for every output feature: the chain of
  ``acc = fma(v[j, c], p[j], acc)`` over keys ``j = l, l + 8, ...`` with the features in the SIMD lanes, 64 (or
  128: ``kqv_lane_wide``) at a time (tinyBLAS holds one feature's 8 key lanes in a register; the fma chain per
  (feature, lane) is the same).
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from rocmforge.exact.lanes import data_pointer, load_vector, splat


def _fma(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    """IR: ``llvm.fma`` on float vectors of any width (each lane rounded once)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(a.type, [a.type] * 3),
                                        f"llvm.fma.v{a.type.count}f32")
    return builder.call(fn, [a, b, c])


def _kq(width: int):
    """``kq_<2 * width>``: the keys of a pass are two blocks of ``width`` lanes (16: zmm registers)."""
    vector = ir.VectorType(ir.FloatType(), width)

    def codegen(context, builder, signature, args):
        k_ptr, q_ptr, out_ptr = (data_pointer(context, builder, signature.args[i], args[i]) for i in (0, 3, 6))
        k0, k_stride, q0, d_len, o0 = args[1], args[2], args[4], args[5], args[7]
        index = k0.type
        n_steps = builder.udiv(d_len, ir.Constant(index, 32))
        accs = [[cgutils.alloca_once(builder, vector) for _ in range(4)] for _ in range(2)]

        def lane(l):  # (acc0 + acc2) + (acc1 + acc3) of ggml's lane l, for both blocks of keys
            for block in accs:
                for acc in block:
                    builder.store(ir.Constant(vector, None), acc)
            with cgutils.for_range(builder, n_steps) as loop:
                for a in range(4):
                    e = builder.add(builder.mul(loop.index, ir.Constant(index, 32)), ir.Constant(index, 8 * a + l))
                    qe = splat(builder, builder.load(builder.gep(q_ptr, [builder.add(q0, e)])), vector)
                    row = builder.add(k0, builder.mul(e, k_stride))
                    for blk, block in enumerate(accs):
                        kv = load_vector(builder, k_ptr, row, vector, width * blk)
                        builder.store(_fma(builder, kv, qe, builder.load(block[a])), block[a])
            return [builder.fadd(builder.fadd(builder.load(b[0]), builder.load(b[2])),
                                 builder.fadd(builder.load(b[1]), builder.load(b[3]))) for b in accs]

        # GGML_F32x8_REDUCE after the lane-wise sum: t_l = m_l + m_{l+4}, then (t0 + t1) + (t2 + t3)
        t = []
        for l in range(4):
            low, high = lane(l), lane(l + 4)
            t.append([builder.fadd(x, y) for x, y in zip(low, high)])
        for blk in range(2):
            total = builder.fadd(builder.fadd(t[0][blk], t[1][blk]), builder.fadd(t[2][blk], t[3][blk]))
            target = builder.gep(out_ptr, [builder.add(o0, ir.Constant(index, width * blk))])
            builder.store(total, builder.bitcast(target, vector.as_pointer()), align=1)
        return context.get_dummy_value()

    return codegen


@intrinsic
def kq_32(typingctx, keys_t, key_start, stride, q, q_start, d, out, out_start):
    """``out[out_start + u] = ggml_vec_dot_f32(k_u, q)`` for the 32 keys ``u`` whose elements are
    ``keys_t[key_start + e * stride + u]`` (keys transposed: element-major; stride 32 reads a tile of 32 keys
    front to back), ``q`` from ``q_start``, ``d`` a multiple of 32."""
    return types.none(keys_t, key_start, stride, q, q_start, d, out, out_start), _kq(16)


def _kqv(width: int):
    """``kqv_lane`` on groups of ``8 * width`` features (8 accumulators of ``width`` lanes: 16 = zmm)."""
    vector = ir.VectorType(ir.FloatType(), width)
    group_size = 8 * width

    def codegen(context, builder, signature, args):
        v_ptr, p_ptr, out_ptr = (data_pointer(context, builder, signature.args[i], args[i]) for i in (0, 3, 7))
        v0, v_stride, j0, n_keys, dv, o0 = args[1], args[2], args[4], args[5], args[6], args[8]
        index = v0.type
        accs = [cgutils.alloca_once(builder, vector) for _ in range(8)]
        with cgutils.for_range(builder, builder.udiv(dv, ir.Constant(index, group_size))) as group:
            c0 = builder.mul(group.index, ir.Constant(index, group_size))
            for acc in accs:
                builder.store(ir.Constant(vector, None), acc)
            with cgutils.for_range(builder, n_keys) as loop:
                j = builder.add(j0, builder.mul(loop.index, ir.Constant(index, 8)))
                pj = splat(builder, builder.load(builder.gep(p_ptr, [j])), vector)
                row = builder.add(builder.add(v0, builder.mul(loop.index, v_stride)), c0)
                for u, acc in enumerate(accs):
                    vv = load_vector(builder, v_ptr, row, vector, width * u)
                    builder.store(_fma(builder, vv, pj, builder.load(acc)), acc)
            for u, acc in enumerate(accs):
                target = builder.gep(out_ptr, [builder.add(builder.add(o0, c0), ir.Constant(index, width * u))])
                builder.store(builder.load(acc), builder.bitcast(target, vector.as_pointer()), align=1)
        return context.get_dummy_value()

    return codegen


@intrinsic
def kqv_lane(typingctx, values, v_start, stride, p, first, count, d_v, out, out_start):
    """``out[out_start + c]`` = the chain ``acc = fma(values[v_start + n * stride + c], p[first + 8 * n], acc)``
    from 0 over ``n < count`` (the values of keys ``first, first + 8, ...``, one row of ``stride`` after the
    other), for every ``c < d_v`` (a multiple of 64)."""
    return types.none(values, v_start, stride, p, first, count, d_v, out, out_start), _kqv(8)


@intrinsic
def kqv_lane_wide(typingctx, values, v_start, stride, p, first, count, d_v, out, out_start):
    """``kqv_lane`` for ``d_v`` a multiple of 128, 128 features at a time (zmm registers)."""
    return types.none(values, v_start, stride, p, first, count, d_v, out, out_start), _kqv(16)
