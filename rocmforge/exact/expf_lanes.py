"""``ggml_v_expf`` (vec.h, AVX2) on 8 float lanes as LLVM vector code, and the two ggml loops built on it: the
softmax's exponentials (``exp_8``, for ``attention``) and SwiGLU's ``silu(x) * g`` (``swiglu_8``, for ``swiglu``).
Lanes that need ggml's slow path get it by select, as ggml's and/andnot masks give them, so every lane has the
value ``simd.v_expf`` gives it.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from rocmforge.exact.lanes import V8F32, V8I32, data_pointer, fma_v8, hsum8_ir, load_vector, splat


def _f8(value: float) -> ir.Constant:
    return ir.Constant(V8F32, [value] * 8)  # llvmlite rounds to float32: every constant here is a float32 value


def _i8(value: int) -> ir.Constant:
    return ir.Constant(V8I32, [value - (1 << 32) if value >= 1 << 31 else value] * 8)


def v_expf_ir(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """IR of ggml's AVX2 ``ggml_v_expf`` (vec.h) on an ``<8 x float>``; the lanes that need its slow path get it by
    select, as ggml's and/andnot masks give them (``simd.v_expf`` is one lane of it)."""
    z = fma_v8(builder, x, _f8(float.fromhex("0x1.715476p+0")), _f8(float.fromhex("0x1.8p23")))
    n = builder.fsub(z, _f8(float.fromhex("0x1.8p23")))
    minus_n = builder.fneg(n)  # fnmadd(n, c, x) = fma(-n, c, x): one rounding either way
    b = fma_v8(builder, minus_n, _f8(float.fromhex("0x1.7f7d1cp-20")),
               fma_v8(builder, minus_n, _f8(float.fromhex("0x1.62e4p-1")), x))
    e = builder.shl(builder.bitcast(z, V8I32), _i8(23))
    k = builder.bitcast(builder.add(e, _i8(0x3F800000)), V8F32)
    abs_n = builder.bitcast(builder.and_(builder.bitcast(n, V8I32), _i8(0x7FFFFFFF)), V8F32)
    c = builder.fcmp_ordered(">", abs_n, _f8(126.0))
    u = builder.fmul(b, b)
    j = fma_v8(builder,
               fma_v8(builder, fma_v8(builder, _f8(float.fromhex("0x1.0e4020p-7")), b,
                                      _f8(float.fromhex("0x1.573e2ep-5"))), u,
                      fma_v8(builder, _f8(float.fromhex("0x1.555e66p-3")), b, _f8(float.fromhex("0x1.fffdb6p-2")))),
               u, builder.fmul(_f8(float.fromhex("0x1.ffffecp-1")), b))
    fast = fma_v8(builder, j, k, k)
    g = builder.select(builder.fcmp_ordered("<=", n, _f8(0.0)), _i8(0x82000000), _i8(0))
    s1 = builder.bitcast(builder.add(g, _i8(0x7F000000)), V8F32)
    s2 = builder.bitcast(builder.sub(e, g), V8F32)
    slow = builder.fmul(fma_v8(builder, s2, j, s2), s1)
    d = builder.fcmp_ordered(">", abs_n, _f8(192.0))
    return builder.select(d, builder.fmul(s1, s1), builder.select(c, slow, fast))


@intrinsic
def exp_8(typingctx, w, start, row_max, out):
    """``out[start:start+8] = ggml_v_expf(w[start:start+8] - row_max)``; returns their ``hsum8`` (float32)."""
    def codegen(context, builder, signature, args):
        w_ptr, out_ptr = (data_pointer(context, builder, signature.args[i], args[i]) for i in (0, 3))
        x = builder.fsub(load_vector(builder, w_ptr, args[1], V8F32), splat(builder, args[2]))
        values = v_expf_ir(builder, x)
        builder.store(values, builder.bitcast(builder.gep(out_ptr, [args[1]]), V8F32.as_pointer()), align=1)
        return hsum8_ir(builder, values)

    return types.float32(w, start, types.float32, out), codegen


@intrinsic
def swiglu_8(typingctx, gate, up, start, out):
    """``out[start:start+8] = gate / (1 + ggml_v_expf(0 - gate)) * up`` on ``[start, start+8)`` (``ggml_v_silu``
    then ``_mm256_mul_ps``, as ``ggml_vec_swiglu_f32``)."""
    def codegen(context, builder, signature, args):
        gate_ptr, up_ptr, out_ptr = (data_pointer(context, builder, signature.args[i], args[i]) for i in (0, 1, 3))
        x = load_vector(builder, gate_ptr, args[2], V8F32)
        e = v_expf_ir(builder, builder.fsub(ir.Constant(V8F32, None), x))
        silu = builder.fdiv(x, builder.fadd(_f8(1.0), e))
        value = builder.fmul(silu, load_vector(builder, up_ptr, args[2], V8F32))
        builder.store(value, builder.bitcast(builder.gep(out_ptr, [args[2]]), V8F32.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.none(gate, up, start, out), codegen
