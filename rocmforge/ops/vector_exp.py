"""``exp_f32``: float32 exp for numba loops, written so LLVM vectorizes the loop that calls it. Not an op: the
helper that the CPU twins of ``gelu`` and ``encoder_attention`` share.

Why not ``math.exp``: in numba that is one call to the C library's ``expf`` per element (no vector math library
is linked), ~10x slower than numpy's SIMD exp, and the encoder evaluates ~t² of them per attention head.

Cephes' ``expf``: x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, so n ln2 is exact), a degree-6 polynomial
for exp(r), and 2**n written straight into a float's exponent bits. Relative error ~1e-7 on [-87, 88]; inputs
below -87 give exp(-87) ~ 1.6e-38 instead of a subnormal, above 88 exp(88).

>>> import numpy as np, numba
>>> numba.njit(lambda x: exp_f32(x))(np.float32(1.0))  # doctest: +ELLIPSIS
2.71828...
"""
from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

_LOG2E = np.float32(1.4426950408889634)
_LN2_HIGH = np.float32(0.693359375)  # few significant bits: n * _LN2_HIGH is exact for the n that occur
_LN2_LOW = np.float32(-2.12194440e-4)


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 ``bits`` (a register reinterpretation, which vectorizes)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.int32), codegen


@numba.njit(inline="always", fastmath=False)
def exp_f32(x: np.float32) -> np.float32:
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - n * _LN2_HIGH - n * _LN2_LOW
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return (p * r * r + r + np.float32(1.0)) * _float_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
