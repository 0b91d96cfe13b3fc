"""numba building blocks that several CPU twins share. Not ops themselves:

- ``exp_f32``: float32 exp written so LLVM vectorizes the loop that calls it (``gelu``, ``encoder_attention``).
  ``math.exp`` in numba is one call to the C library's ``expf`` per element (no vector math library is linked),
  ~10x slower than numpy's SIMD exp. Cephes' ``expf``: x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, so
  n ln2 is exact), a degree-6 polynomial for exp(r), and 2**n written straight into a float's exponent bits.
  Relative error < 1 ulp on [-87, 88]; below -87 it gives exp(-87) ~ 1.6e-38 instead of a subnormal, above 88 exp(88).
- ``gelu_f32``: the exact GELU on ``exp_f32`` (``gelu``, ``linear``).
- ``gemm`` and ``element``: SciPy's single-precision BLAS gemm (the entry numba's own ``np.dot`` calls) on blocks of
  row-major arrays addressed in place (``linear``, from inside numba's parallel loop; ``encoder_attention`` calls
  no BLAS), so one thread pool (numba's) runs the whole encoder. BLAS's own threads would otherwise spin for a while after
  each product and take a core from the next kernel (measured: the attention ran 2.2x slower right after a
  matmul). Call such a kernel inside ``blas_on_numba_threads()``.
- ``blas_on_numba_threads``: one such kernel at a time in the process, with SciPy's BLAS on one thread while it
  runs, else each of numba's threads starts a threaded sgemm (OpenBLAS has a history of wrong results when
  threaded calls overlap: OpenMathLib/OpenBLAS#1755, #2126, #5825). The per-call ``threadpoolctl`` limit it
  replaces let that happen two ways: threadpoolctl ignores a limit from any Python thread but the one that set one
  first while that one lives (a test's server thread, say), and two threads' limits interleave their set and
  restore (the store embeds from any thread), which also left the process at 1 BLAS thread afterwards.

>>> import numpy as np, numba
>>> numba.njit(lambda x: exp_f32(x))(np.float32(1.0))  # doctest: +ELLIPSIS
2.71828...
"""
from __future__ import annotations

import ctypes
import itertools
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic
from threadpoolctl import ThreadpoolController

_LOG2E = np.float32(1.4426950408889634)
_LN2_HIGH = np.float32(0.693359375)  # few significant bits: n * _LN2_HIGH is exact for the n that occur
_LN2_LOW = np.float32(-2.12194440e-4)


class _BlasThreads:
    """Get/set the thread count of the BLAS library ``numba_xxgemm`` ends in: the OpenBLAS SciPy's wheel bundles
    (``scipy.libs/``; else, SciPy built against a system BLAS, every BLAS library loaded). numpy's own OpenBLAS is
    left alone: the LLM's CPU forwards run on it, possibly in other threads at the same time. An OpenBLAS count is
    set through the library's own function: threadpoolctl (>= 3.6) lets only one Python thread, the first that
    set a limit while it lives, change a pthreads OpenBLAS, and ignores the others without a word."""

    def __init__(self) -> None:
        import scipy
        import scipy.linalg.cython_blas  # noqa: F401  the BLAS numba_xxgemm calls, loaded before the controller looks

        blas = ThreadpoolController().select(user_api="blas")
        scipy_home = Path(scipy.__file__).resolve().parent
        bundled = [lib for lib in blas.lib_controllers
                   if Path(lib.filepath).resolve().parent in (scipy_home.with_name("scipy.libs"), scipy_home)]
        self.libraries = bundled or blas.lib_controllers
        self._functions = [self._openblas_functions(lib) or (lib.get_num_threads, lib.set_num_threads)
                           for lib in self.libraries]

    @staticmethod
    def _openblas_functions(lib: Any) -> tuple[Callable[[], int], Callable[[int], None]] | None:
        if lib.internal_api != "openblas" or lib.threading_layer == "openmp":
            return None
        dynlib = ctypes.CDLL(lib.filepath)
        for prefix, suffix in itertools.product(("", "scipy_"), ("", "64_", "_64")):
            get = getattr(dynlib, f"{prefix}openblas_get_num_threads{suffix}", None)
            if get is not None:
                return get, getattr(dynlib, f"{prefix}openblas_set_num_threads{suffix}")
        return None

    def counts(self) -> list[int]:
        return [get() for get, _ in self._functions]

    def set(self, counts: list[int]) -> None:
        for (get, set_count), n in zip(self._functions, counts):
            if get() != n:
                set_count(n)


@cache
def scipy_blas() -> _BlasThreads:
    """SciPy's BLAS, loaded on first use: ~17 MiB resident that only the kernels calling ``gemm`` need, not a
    process that only generates text."""
    return _BlasThreads()


_ONE_KERNEL_AT_A_TIME = threading.Lock()


@contextmanager
def blas_on_numba_threads() -> Iterator[None]:
    """Run a numba kernel whose threads call ``gemm``: the only one in the process (it uses every core anyway),
    with SciPy's BLAS on one thread, put back as it was afterwards.

    >>> with blas_on_numba_threads():
    ...     scipy_blas().counts() == [1] * len(scipy_blas().libraries)
    True
    """
    with _ONE_KERNEL_AT_A_TIME:
        before = scipy_blas().counts()
        scipy_blas().set([1] * len(before))
        try:
            yield
        finally:
            scipy_blas().set(before)


# column-major sgemm with explicit leading dimensions: numba_xxgemm(kind, transa, transb, m, n, k, &alpha, a, lda,
# b, ldb, &beta, c, ldc) from numba's helper library
gemm = types.ExternalFunction("numba_xxgemm", types.intc(
    types.int8, types.int8, types.int8, types.intp, types.intp, types.intp,
    types.voidptr, types.voidptr, types.intp, types.voidptr, types.intp,
    types.voidptr, types.voidptr, types.intp))
SINGLE, NO_TRANSPOSE, TRANSPOSE = np.int8(ord("s")), np.int8(ord("n")), np.int8(ord("t"))


@intrinsic
def element(typingctx, array, index):
    """The address of the element ``index`` elements past ``array``'s first, as a ``void*`` (what BLAS takes):
    ``array.flat[index]`` of a C-contiguous array; of a view whose rows are ``ld`` elements apart, row
    ``index // ld``'s column ``index % ld``."""
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
