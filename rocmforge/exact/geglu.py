"""ggml's ``ggml_vec_geglu_f32`` (vec.h) on this build: ``GGML_GELU_FP16`` is defined, so GELU is not evaluated
per element but looked up in ``ggml_table_gelu_f16`` -- the tanh-approximated GELU of every fp16 value, filled
once by ``ggml_cpu_init`` and rounded to fp16 -- at the input rounded to fp16 (``_cvtss_sh``, half to even).
Inputs at or below -10 give exactly 0, at or above 10 pass through; the result is ``gelu(gate) * up`` in float32.

The table is rebuilt here as ggml-cpu.c builds it (GCC contracts ``GELU_COEF_A*x*x + 1`` into one fma):
``(0.5*x) * (1 + tanhf((SQRT_2_OVER_PI*x) * fma(GELU_COEF_A*x, x, 1)))``, then rounded to fp16.
"""
from __future__ import annotations

import math
from functools import cache

import numpy as np
from numba import njit, prange

from rocmforge.exact.simd import fma32, fp16_bits
from rocmforge.exact.threads import ELEMENT_WORK, split_rows

_SQRT_2_OVER_PI = np.float32(0.79788456080286535587989211986876)
_GELU_COEF_A = np.float32(0.044715)


@njit(cache=True)
def _gelu_f32(x):  # pragma: no cover - compiled
    out = np.empty_like(x)
    one, half = np.float32(1), np.float32(0.5)
    for i in range(x.size):
        v = x[i]
        inner = (_SQRT_2_OVER_PI * v) * fma32(_GELU_COEF_A * v, v, one)
        out[i] = (half * v) * (np.float32(math.tanh(inner)) + one)
    return out


@cache
def gelu_table() -> np.ndarray:
    """``ggml_table_gelu_f16`` as float32 ``[65536]``, indexed by the fp16 bits of the input.

    >>> import numpy as np
    >>> float(gelu_table()[np.array([1.0], np.float16).view(np.uint16)[0]])
    0.84130859375
    """
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):  # NaN/inf inputs: never looked up (|x| >= 10 bypasses the table)
        return _gelu_f32(x).astype(np.float16).astype(np.float32)


def geglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``gelu(gate) * up`` as llama.cpp's CPU backend computes it (float32, same shapes).

    >>> import numpy as np
    >>> geglu(np.array([-11.0, 1.0, 12.0], np.float32), np.full(3, 2.0, np.float32)).tolist()
    [0.0, 1.6826171875, 24.0]
    """
    gate = np.ascontiguousarray(gate, dtype=np.float32)
    out = np.empty_like(gate)
    rows = gate.reshape(-1, gate.shape[-1])
    args = (rows, np.ascontiguousarray(up, dtype=np.float32).reshape(rows.shape), gelu_table(), out.reshape(rows.shape))
    split_rows(_geglu_parallel, _geglu, args, rows.shape[0], work=rows.size * ELEMENT_WORK)
    return out


@njit(cache=True, nogil=True)
def _geglu(gate, up, table, out, start, stop):  # pragma: no cover - compiled
    for r in range(start, stop):
        for i in range(gate.shape[1]):
            x = gate[r, i]
            if x <= np.float32(-10):
                out[r, i] = 0
            elif x >= np.float32(10):
                out[r, i] = x * up[r, i]
            else:
                out[r, i] = table[fp16_bits(x)] * up[r, i]


@njit(cache=True, parallel=True)
def _geglu_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of rows per thread (threads.split_rows)
        _geglu(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)
