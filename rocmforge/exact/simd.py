"""The scalar building blocks of ggml's AVX2 code, for numba kernels: a real fused multiply-add, float32 <-> bits,
fp16 rounding (F16C), the horizontal sum ggml uses to reduce an 8-lane accumulator, and ``ggml_v_expf`` lane by
lane.

Everything stays float32: numba keeps ``float32 op float32`` in float32 without contracting ``a*b + c`` into an
fma (no fastmath), so each expression below rounds exactly where the intrinsic it mirrors rounds. Constants are
``np.float32`` (a Python float would promote the expression to float64).

>>> import numpy as np
>>> float(fma32(np.float32(0.1), np.float32(10.0), np.float32(-1.0)))  # one rounding: not 0.0 as 0.1*10 - 1 is
1.4901161193847656e-08
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def _fma(typingctx, a, b, c):
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.fma(*args)  # llvm.fma.f32: one rounding (vfmadd on an FMA CPU, libm fmaf otherwise)

    return sig, codegen


@intrinsic
def _bits(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _from_bits(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _fp16_bits(typingctx, x):
    def codegen(context, builder, signature, args):  # fptrunc rounds half to even, as _cvtss_sh and numpy
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _round_fp16(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.float32), codegen


@njit(inline="always")
def fp16_bits(x: np.float32) -> int:
    """The IEEE half-precision bits of ``x`` rounded to fp16 (``GGML_CPU_FP32_TO_FP16``)."""
    return _fp16_bits(np.float32(x))


@njit(inline="always")
def round_fp16(x: np.float32) -> np.float32:
    """``x`` rounded to fp16 and back: the value of a float stored as ``ggml_fp16_t``."""
    return _round_fp16(np.float32(x))


@njit(inline="always")
def fma32(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """``a*b + c`` rounded once to float32 (``_mm256_fmadd_ps``)."""
    return _fma(np.float32(a), np.float32(b), np.float32(c))


@njit(inline="always")
def f32_bits(x: np.float32) -> int:
    """The IEEE bits of a float32 as a non-negative int."""
    return int(_bits(np.float32(x)))


@njit(inline="always")
def f32_from_bits(bits: int) -> np.float32:
    """The float32 whose IEEE bits are the low 32 bits of ``bits``."""
    return _from_bits(np.uint32(bits & 0xFFFFFFFF))


@njit(inline="always")
def hsum8(a: np.ndarray) -> np.float32:
    """``hsum_float_8`` (quants.c) and tinyBLAS's ``hsum``: high half + low half, then movehl, then movehdup:
    ((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7))."""
    t0 = a[0] + a[4]
    t1 = a[1] + a[5]
    t2 = a[2] + a[6]
    t3 = a[3] + a[7]
    return (t0 + t2) + (t1 + t3)


_R = np.float32(float.fromhex("0x1.8p23"))
_LOG2E = np.float32(float.fromhex("0x1.715476p+0"))
_LN2_HI = np.float32(float.fromhex("0x1.62e4p-1"))
_LN2_LO = np.float32(float.fromhex("0x1.7f7d1cp-20"))
_P0 = np.float32(float.fromhex("0x1.0e4020p-7"))
_P1 = np.float32(float.fromhex("0x1.573e2ep-5"))
_P2 = np.float32(float.fromhex("0x1.555e66p-3"))
_P3 = np.float32(float.fromhex("0x1.fffdb6p-2"))
_P4 = np.float32(float.fromhex("0x1.ffffecp-1"))
_ONE_BITS = 0x3F800000


@njit(inline="always")
def v_expf(x: np.float32) -> np.float32:
    """One lane of ggml's AVX2 ``ggml_v_expf`` (vec.h): exp(x) as 2^n * (1 + polynomial), ~1.5 ulp, not libm's
    expf. The vector code takes its slow path for all 8 lanes when any lane needs it, but on a lane that does not
    that path computes the same ``fma(k, j, k)``, so each lane's value depends on that lane only."""
    z = fma32(x, _LOG2E, _R)
    n = z - _R
    b = fma32(-n, _LN2_LO, fma32(-n, _LN2_HI, x))
    e = (f32_bits(z) << 23) & 0xFFFFFFFF
    k = f32_from_bits(e + _ONE_BITS)
    u = b * b
    j = fma32(fma32(fma32(_P0, b, _P1), u, fma32(_P2, b, _P3)), u, _P4 * b)
    if not abs(n) > np.float32(126):
        return fma32(j, k, k)
    g = 0x82000000 if n <= np.float32(0) else 0
    s1 = f32_from_bits(g + 0x7F000000)
    s2 = f32_from_bits(e - g)
    if abs(n) > np.float32(192):
        return s1 * s1
    return fma32(s2, j, s2) * s1
