"""Pure-Python float32 arithmetic for replaying ggml's operation order in the cpu-exact tests: one IEEE operation
at a time, with the fused multiply-add rounded once from exact rationals (not by the LLVM intrinsic the kernels use).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

f32 = np.float32


def round_f32(q: Fraction) -> np.float32:
    """A rational rounded once to the nearest float32 (ties to even), for normal-range values."""
    if q == 0:
        return f32(0.0)
    a = abs(q)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    n = round(a / Fraction(2) ** (e - 23))  # Fraction rounds half to even
    return f32(math.copysign(float(n * Fraction(2) ** (e - 23)), q))


def fma(a, b, c) -> np.float32:
    """``a * b + c`` rounded once to float32."""
    return round_f32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


def hsum8(a) -> np.float32:
    """ggml's ``hsum_float_8`` of 8 float32 lanes."""
    t = [f32(a[i]) + f32(a[i + 4]) for i in range(4)]
    return (t[0] + t[2]) + (t[1] + t[3])
