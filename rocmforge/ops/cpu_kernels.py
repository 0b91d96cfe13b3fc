"""numba building blocks that several CPU twins share. Not ops themselves:

- ``exp_f32``: float32 exp written so LLVM vectorizes the loop that calls it (``gelu``, ``encoder_attention``).
  ``math.exp`` in numba is one call to the C library's ``expf`` per element (no vector math library is linked),
  ~10x slower than numpy's SIMD exp. Cephes' ``expf``: x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, so
  n ln2 is exact), a degree-6 polynomial for exp(r), and 2**n written straight into a float's exponent bits.
  Relative error < 1 ulp on [-87, 88]; below -87 it gives exp(-87) ~ 1.6e-38 instead of a subnormal, above 88 exp(88).
- ``gelu_f32``: the exact GELU on ``exp_f32`` (``gelu``, ``linear``).
- ``gemm`` and ``element``: SciPy's single-precision BLAS gemm (the entry numba's own ``np.dot`` calls) on blocks of
  row-major arrays addressed in place (``linear``, ``encoder_attention``), from inside numba's parallel loops, so
  one thread pool (numba's) runs the whole encoder. BLAS's own threads would otherwise spin for a while after
  each product and take a core from the next kernel (measured: the attention ran 2.2x slower right after a
  matmul). Call it with SciPy's BLAS held to one thread (``BLAS.limit(limits=1, user_api="blas")``).

>>> import numpy as np, numba
>>> numba.njit(lambda x: exp_f32(x))(np.float32(1.0))  # doctest: +ELLIPSIS
2.71828...
"""
from __future__ import annotations

import math

import numba
import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  the BLAS numba_xxgemm calls, loaded now so BLAS below sees it
from numba import types
from numba.extending import intrinsic
from threadpoolctl import ThreadpoolController

_LOG2E = np.float32(1.4426950408889634)
_LN2_HIGH = np.float32(0.693359375)  # few significant bits: n * _LN2_HIGH is exact for the n that occur
_LN2_LOW = np.float32(-2.12194440e-4)

BLAS = ThreadpoolController()

# column-major sgemm with explicit leading dimensions: numba_xxgemm(kind, transa, transb, m, n, k, &alpha, a, lda,
# b, ldb, &beta, c, ldc) from numba's helper library
gemm = types.ExternalFunction("numba_xxgemm", types.intc(
    types.int8, types.int8, types.int8, types.intp, types.intp, types.intp,
    types.voidptr, types.voidptr, types.intp, types.voidptr, types.intp,
    types.voidptr, types.voidptr, types.intp))
SINGLE, NO_TRANSPOSE, TRANSPOSE = np.int8(ord("s")), np.int8(ord("n")), np.int8(ord("t"))


@intrinsic
def element(typingctx, array, index):
    """The address of ``array.flat[index]`` as a ``void*`` (what BLAS takes), for a C-contiguous array."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.bitcast(builder.gep(data, [args[1]]), context.get_value_type(types.voidptr))

    return types.voidptr(array, types.intp), codegen


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


@numba.njit(inline="always", fastmath=False)
def gelu_f32(v: np.float32) -> np.float32:
    """The exact GELU, 0.5 v erfc(-v / sqrt 2), with Numerical Recipes' ``erfcc`` (a Chebyshev fit, relative error
    < 1.2e-7 for every argument): through erfc the negative tail keeps the relative accuracy that 1 + erf loses."""
    u = v * np.float32(-1.0 / math.sqrt(2.0))  # Phi(v) = erfc(u) / 2
    z = abs(u)
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.5) * z)
    poly = np.float32(0.17087277)  # Horner, written out: LLVM vectorizes straight-line code
    poly = poly * t + np.float32(-0.82215223)
    poly = poly * t + np.float32(1.48851587)
    poly = poly * t + np.float32(-1.13520398)
    poly = poly * t + np.float32(0.27886807)
    poly = poly * t + np.float32(-0.18628806)
    poly = poly * t + np.float32(0.09678418)
    poly = poly * t + np.float32(0.37409196)
    poly = poly * t + np.float32(1.00002368)
    erfc_z = t * exp_f32(-z * z - np.float32(1.26551223) + t * poly)
    erfc_u = erfc_z if u >= np.float32(0.0) else np.float32(2.0) - erfc_z
    return np.float32(0.5) * v * erfc_u
