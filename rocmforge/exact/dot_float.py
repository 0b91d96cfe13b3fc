"""``x @ W.T`` for F32, F16 and BF16 weights as ggml's x86 CPU backend (AVX2, FMA, F16C, llamafile) computes it.

ggml first rounds the float32 activations to the weight's type (``vec_dot_type``: F16 round-half-even as F16C's
``vcvtps2ph``, BF16 as ``GGML_FP32_TO_BF16``), then per output:

- one activation row, or an output count that is not a multiple of 4 (tinyBLAS declines): the type's
  ``ggml_vec_dot`` (vec.cpp): four 8-lane accumulators over steps of 32, ``acc = fma(w, x, acc)``; F32 and F16
  reduce them by ``GGML_F32x8_REDUCE`` (``dot_f32``), BF16's own AVX2 loop by ``hsum_float_8``'s order.
- two or more rows: llamafile's ``tinyBLAS<8, __m256>``: one 8-lane accumulator over steps of 8, ``hsum``.

Weights stay as stored (half-precision bits are widened lane by lane in the kernel, exactly). The input length
must be a multiple of 32 (every real model's): ggml's scalar leftovers are not reproduced.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from rocmforge.errors import UnsupportedError
from rocmforge.exact.lanes import OUT_TILE, V8F32, data_pointer, fma_v8, hsum8_ir, load_vector
from rocmforge.exact.threads import split_rows

_I32 = ir.IntType(32)
_V8I16 = ir.VectorType(ir.IntType(16), 8)
_V8I32 = ir.VectorType(_I32, 8)
_KINDS = {T.F32: 0, T.F16: 1, T.BF16: 2}


class FloatWeight(NamedTuple):
    """A float weight as stored: ``values`` float32 ``[out, k]`` (F32) or the half-precision bits as uint16."""

    values: np.ndarray
    kind: int  # 0 F32, 1 F16, 2 BF16


def _load_weights(builder: ir.IRBuilder, pointer: ir.Value, index: ir.Value, kind: int, plus: int) -> ir.Value:
    if kind == 0:
        return load_vector(builder, pointer, index, V8F32, plus)
    bits = load_vector(builder, pointer, index, _V8I16, plus)
    if kind == 1:  # F16C vcvtph2ps
        return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), 8)), V8F32)
    return builder.bitcast(builder.shl(builder.zext(bits, _V8I32), ir.Constant(_V8I32, [16] * 8)), V8F32)


def _reduce4(builder: ir.IRBuilder, s: list[ir.Value], hsum_order: bool) -> ir.Value:
    # (s0+s2) + (s1+s3) lane by lane, the 128-bit halves added, then GGML_F32x8_REDUCE's two hadds
    # ((t0+t1)+(t2+t3)) or, for BF16's loop, movehl + movehdup ((t0+t2)+(t1+t3))
    lanes = builder.fadd(builder.fadd(s[0], s[2]), builder.fadd(s[1], s[3]))
    e = [builder.extract_element(lanes, ir.Constant(_I32, i)) for i in range(8)]
    t = [builder.fadd(e[i], e[i + 4]) for i in range(4)]
    if hsum_order:
        return builder.fadd(builder.fadd(t[0], t[2]), builder.fadd(t[1], t[3]))
    return builder.fadd(builder.fadd(t[0], t[1]), builder.fadd(t[2], t[3]))


def _float_dot(kind: int, n_accumulators: int):
    """An intrinsic: ``dot(w, w0, x, x0, k)`` of weight row ``w[w0:w0+k]`` (``kind``) and float32 ``x[x0:x0+k]``
    with ``n_accumulators`` 8-lane accumulators taking consecutive groups of 8 (4: vec_dot, 1: tinyBLAS)."""
    step = 8 * n_accumulators

    @intrinsic
    def dot(typingctx, w, w0, x, x0, k):
        def codegen(context, builder, signature, args):
            w_ptr, x_ptr = (data_pointer(context, builder, signature.args[i], args[i]) for i in (0, 2))
            w0, x0, k = args[1], args[3], args[4]
            n_steps = builder.udiv(k, ir.Constant(k.type, step))
            accs = [cgutils.alloca_once_value(builder, ir.Constant(V8F32, None)) for _ in range(n_accumulators)]
            with cgutils.for_range(builder, n_steps) as loop:
                start = builder.mul(loop.index, ir.Constant(loop.index.type, step))
                w_at, x_at = builder.add(w0, start), builder.add(x0, start)
                for j, acc in enumerate(accs):
                    a = _load_weights(builder, w_ptr, w_at, kind, 8 * j)
                    b = load_vector(builder, x_ptr, x_at, V8F32, 8 * j)
                    builder.store(fma_v8(builder, a, b, builder.load(acc)), acc)
            s = [builder.load(acc) for acc in accs]
            return hsum8_ir(builder, s[0]) if n_accumulators == 1 else _reduce4(builder, s, hsum_order=kind == 2)

        return types.float32(w, w0, x, x0, k), codegen

    return dot


_DOTS = [(_float_dot(kind, 4), _float_dot(kind, 1)) for kind in range(3)]
_vec_f32, _tiny_f32 = _DOTS[0]
_vec_f16, _tiny_f16 = _DOTS[1]
_vec_bf16, _tiny_bf16 = _DOTS[2]


@njit(cache=True, nogil=True)
def _matmul(w, kind, x, tinyblas, out, start, stop):  # pragma: no cover - compiled
    # output rows start..stop, OUT_TILE at a time (their weight rows stay in cache while every activation row passes)
    k = x.shape[1]
    w_flat, x_flat = w.reshape(-1), x.reshape(-1)
    for o0 in range(start, stop, OUT_TILE):
        for r in range(x.shape[0]):
            for o in range(o0, min(o0 + OUT_TILE, stop)):
                if kind == 0:
                    out[r, o] = _tiny_f32(w_flat, o * k, x_flat, r * k, k) if tinyblas else \
                        _vec_f32(w_flat, o * k, x_flat, r * k, k)
                elif kind == 1:
                    out[r, o] = _tiny_f16(w_flat, o * k, x_flat, r * k, k) if tinyblas else \
                        _vec_f16(w_flat, o * k, x_flat, r * k, k)
                else:
                    out[r, o] = _tiny_bf16(w_flat, o * k, x_flat, r * k, k) if tinyblas else \
                        _vec_bf16(w_flat, o * k, x_flat, r * k, k)


@njit(cache=True, parallel=True)
def _matmul_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of output rows per thread (threads.split_rows)
        _matmul(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)


def prepare_float(ggml_type: T):
    """``ExactMatmul.prepare`` for a float type: raw rows ``[out, bytes]`` -> ``FloatWeight`` (a view, no copy)."""
    kind = _KINDS[ggml_type]

    def prepare(raw: np.ndarray) -> FloatWeight:
        values = np.asarray(raw).view(np.float32 if kind == 0 else np.uint16)
        if values.shape[1] % 32:
            raise UnsupportedError(f"device='cpu-exact': {ggml_type.name} rows of {values.shape[1]} values "
                                   "(not a multiple of 32) have no exact kernel; use device='cpu'")
        return FloatWeight(values, kind)

    return prepare


def round_f16(x: np.ndarray) -> np.ndarray:
    """float32 activations rounded to fp16 (half to even, as ``vcvtps2ph``), kept as float32 values."""
    with np.errstate(over="ignore"):  # beyond fp16's range: inf, as in ggml
        return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 activations rounded to bf16 (``GGML_FP32_TO_BF16``: half to even on the top 16 bits), as float32."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((bits >> 16) | 64) << 16, rounded).astype(np.uint32).view(np.float32)


def matmul_float(x: np.ndarray, weight: FloatWeight) -> np.ndarray:
    """Rounded float32 activations ``[n, k]`` (``round_f16``/``round_bf16`` for those types) times a float weight
    ``[out, k]``: ``[n, out]``.

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float16)
    >>> x = round_f16(np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64))
    >>> y = matmul_float(x, prepare_float(T.F16)(w.view(np.uint8)))
    >>> bool(np.allclose(y, x @ w.astype(np.float32).T, rtol=1e-5, atol=1e-5))
    True
    """
    values, kind = weight
    n, n_out = x.shape[0], values.shape[0]
    out = np.empty((n, n_out), dtype=np.float32)
    tinyblas = n >= 2 and n_out % 4 == 0  # llamafile_sgemm: from 2 rows, m % 4 == 0 (else ggml's vec_dot)
    split_rows(_matmul_parallel, _matmul, (values, kind, np.ascontiguousarray(x, np.float32), tinyblas, out),
               n_out, work=n * n_out * x.shape[1])
    return out
