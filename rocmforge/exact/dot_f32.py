"""The float32 dot products of attention with an F32 KV cache (flash attention off), in ggml's two orders:

- ``ggml_vec_dot_f32`` (vec.cpp, AVX2): four 8-lane accumulators over steps of 32 (element ``i`` goes to
  accumulator ``(i % 32) // 8``, lane ``i % 8``; ``acc = fma(x, y, acc)``), reduced by ``GGML_F32x8_REDUCE``.
  ggml uses it for every ``kq = k . q`` and, for a single query row (decode), for ``kqv = v . softmax``.
- llamafile's ``tinyBLAS`` F32 kernel: one 8-lane accumulator over steps of 8, reduced by ``hsum8``. ggml uses it
  for ``kqv`` when the batch has two or more query rows (prefill), as the softmax is then a contiguous matrix.

Lengths must be multiples of 32 (resp. 8): pad with zeros, which add nothing to any lane.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from rocmforge.exact.lanes import V8F32, fma_v8, hsum8_ir, load_vector

_I32 = ir.IntType(32)


def _f32_dot(n_accumulators: int):
    """An intrinsic: the dot of two contiguous 1-D float32 arrays with ``n_accumulators`` 8-lane accumulators
    taking consecutive groups of 8 (4: ``ggml_vec_dot_f32``, reduced by ``GGML_F32x8_REDUCE``; 1: tinyBLAS,
    reduced by ``hsum8``). Register accumulators: no array per call."""
    step = 8 * n_accumulators

    @intrinsic
    def dot(typingctx, x, y):
        if not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == types.float32
                   for a in (x, y)):
            return None

        def codegen(context, builder, signature, args):
            x_arr, y_arr = (context.make_array(t)(context, builder, a) for t, a in zip(signature.args, args))
            n_steps = builder.udiv(x_arr.nitems, ir.Constant(x_arr.nitems.type, step))
            accs = [cgutils.alloca_once_value(builder, ir.Constant(V8F32, None)) for _ in range(n_accumulators)]
            with cgutils.for_range(builder, n_steps) as loop:
                start = builder.mul(loop.index, ir.Constant(loop.index.type, step))
                for j, acc in enumerate(accs):
                    a = load_vector(builder, x_arr.data, start, V8F32, 8 * j)
                    b = load_vector(builder, y_arr.data, start, V8F32, 8 * j)
                    builder.store(fma_v8(builder, a, b, builder.load(acc)), acc)
            s = [builder.load(acc) for acc in accs]
            if n_accumulators == 1:
                return hsum8_ir(builder, s[0])
            # GGML_F32x8_REDUCE: (s0+s2) + (s1+s3) lane by lane, then the 128-bit halves, then two hadds
            lanes = builder.fadd(builder.fadd(s[0], s[2]), builder.fadd(s[1], s[3]))
            e = [builder.extract_element(lanes, ir.Constant(_I32, i)) for i in range(8)]
            t = [builder.fadd(e[i], e[i + 4]) for i in range(4)]
            return builder.fadd(builder.fadd(t[0], t[1]), builder.fadd(t[2], t[3]))

        return types.float32(x, y), codegen

    return dot


_vec_dot = _f32_dot(4)
_tinyblas_dot = _f32_dot(1)


@njit(inline="always")
def vec_dot_f32(x: np.ndarray, y: np.ndarray) -> np.float32:
    """``ggml_vec_dot_f32`` of two contiguous float32 vectors whose length is a multiple of 32."""
    return _vec_dot(x, y)


@njit(inline="always")
def tinyblas_dot_f32(x: np.ndarray, y: np.ndarray) -> np.float32:
    """tinyBLAS's float32 dot product of two contiguous vectors whose length is a multiple of 8."""
    return _tinyblas_dot(x, y)
