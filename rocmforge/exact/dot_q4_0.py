"""``x @ W.T`` for a Q4_0 weight as ggml computes it on AVX2, which depends on the weight's row count:

- a multiple of 8 (every real model's layers): ``CPU_REPACK`` stores it as ``q4_0_8x8`` and multiplies with
  ``ggml_gemv_q4_0_8x8_q8_0`` / ``ggml_gemm_q4_0_8x8_q8_0`` (arch/x86/repack.cpp). Both give an output one float
  accumulator: per 32-weight block the exact integer ``sum (q - 8) * q8``, then
  ``acc = fma(float(sum), d_w * d_x, acc)`` (``RepackedWeight``, ``matmul_repacked``; IQ4_NL's repacked kernels
  are the same with its value table, ``dot_iq4_nl``).
- otherwise: ``ggml_vec_dot_q4_0_q8_0`` (one row) or ``tinyBLAS_Q0_AVX`` (two or more), which do what the Q8_0
  kernel does once the bytes ``q - 8`` are formed: 8 int lanes, ``fma(d_w*d_x, lane, acc)``, ``hsum8``
  (``LaneWeight`` with offset 8 through ``dot_q8_0.matmul_lanes``).

A Q4_0 block (18 bytes) is an fp16 scale and 16 bytes of nibbles: element ``i < 16`` the low nibble of byte ``i``,
``16 + i`` its high nibble; the weight is ``d * (q - 8)``. Activations are ggml's q8_0 blocks (the repacked
path's ``ggml_quantize_mat_q8_0_4x8`` computes the same values as ``quantize_row_q8_0``).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from rocmforge.exact.dot_q8_0 import matmul_lanes
from rocmforge.exact.lanes import (OUT_TILE, V32I8, LaneWeight, data_pointer, fma_f32, lane_sums, load_vector, offset,
                                   reduce_add)
from rocmforge.exact.q8_activations import Q8Blocks, quantize_q8
from rocmforge.exact.threads import split_rows

BLOCK_BYTES = 18
OFFSET = 8
REPACK_ROWS = 8  # ggml_repack_get_optimal_repack_type: AVX2 and ne[1] % 8 == 0 -> q4_0_8x8_q8_0


class RepackedWeight(NamedTuple):
    """A weight llama.cpp repacks to 8x8 blocks of 32: ``q`` uint8 ``[out, k]`` (the value is ``q - offset``: Q4_0's
    codes with offset 8, IQ4_NL's table values + 128 with offset 128), ``d`` float32 ``[out, k/32]``."""

    q: np.ndarray
    d: np.ndarray
    offset: int


def split_q4_0(raw: np.ndarray) -> RepackedWeight | LaneWeight:
    """Raw Q4_0 rows ``[out, bytes]`` -> what ``matmul_q4_0`` takes (``RepackedWeight`` when ``out % 8 == 0``).

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import dequantize, quantize
    >>> raw = quantize(np.linspace(-1, 1, 512, dtype=np.float32).reshape(8, 64), T.Q4_0)
    >>> q, d, _ = split_q4_0(raw)
    >>> bool(np.array_equal((q.reshape(8, 2, 32) - 8.0) * d[..., None], dequantize(raw, T.Q4_0).reshape(8, 2, 32)))
    True
    """
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, BLOCK_BYTES)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., 2:]
    q = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).astype(np.uint8).reshape(raw.shape[0], -1)
    return RepackedWeight(q, d, OFFSET) if raw.shape[0] % REPACK_ROWS == 0 else LaneWeight(q, d, OFFSET)


def _block_chain_dot(offset_value: int):
    """An intrinsic: one output of the repacked kernels, ``acc = fma(float(sum (q - offset) * x), d_w * d_x, acc)``
    per block."""

    @intrinsic
    def chain_dot(typingctx, q, q0, wd, wd0, x, x0, xd, xd0, n_blocks):
        def codegen(context, builder, signature, args):
            q_ptr, wd_ptr, x_ptr, xd_ptr = (data_pointer(context, builder, signature.args[i], args[i])
                                            for i in (0, 2, 4, 6))
            q0, wd0, x0, xd0, n = args[1], args[3], args[5], args[7], args[8]
            f32 = ir.FloatType()
            acc = cgutils.alloca_once_value(builder, ir.Constant(f32, 0.0))
            offsets = ir.Constant(V32I8, [offset_value] * 32)
            with cgutils.for_range(builder, n) as loop:
                b = loop.index
                x_bytes = load_vector(builder, x_ptr, offset(builder, x0, b, 32), V32I8)
                q_bytes = load_vector(builder, q_ptr, offset(builder, q0, b, 32), V32I8)
                sums = builder.sub(lane_sums(builder, q_bytes, x_bytes), lane_sums(builder, offsets, x_bytes))
                scale = builder.fmul(builder.load(builder.gep(wd_ptr, [builder.add(wd0, b)])),
                                     builder.load(builder.gep(xd_ptr, [builder.add(xd0, b)])))
                builder.store(fma_f32(builder, builder.sitofp(reduce_add(builder, sums), f32), scale,
                                      builder.load(acc)), acc)
            return builder.load(acc)

        return types.float32(q, q0, wd, wd0, x, x0, xd, xd0, n_blocks), codegen

    return chain_dot


_chain_q4_0, _chain_iq4_nl = _block_chain_dot(OFFSET), _block_chain_dot(128)


@njit(cache=True, nogil=True)
def _matmul(q, wd, q_offset, xq, xd, out, start, stop):  # pragma: no cover - compiled
    # output rows start..stop, OUT_TILE at a time (their weight rows stay in L1 while all activation rows pass)
    nb = wd.shape[1]
    q_flat, wd_flat, x_flat, xd_flat = q.reshape(-1), wd.reshape(-1), xq.reshape(-1), xd.reshape(-1)
    for o0 in range(start, stop, OUT_TILE):
        for r in range(xq.shape[0]):
            for o in range(o0, min(o0 + OUT_TILE, stop)):
                a = (q_flat, o * nb * 32, wd_flat, o * nb, x_flat, r * nb * 32, xd_flat, r * nb, nb)
                out[r, o] = _chain_q4_0(*a) if q_offset == OFFSET else _chain_iq4_nl(*a)


@njit(cache=True, parallel=True)
def _matmul_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of output rows per thread (threads.split_rows)
        _matmul(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)


def matmul_repacked(x: np.ndarray | Q8Blocks, weight: RepackedWeight) -> np.ndarray:
    """float32 ``x`` ``[n, k]`` (or its q8_0 blocks) times a repacked weight ``[out, k]``: ``[n, out]``."""
    blocks = x if isinstance(x, Q8Blocks) else quantize_q8(x, with_sum=False)
    n, n_out = blocks.qs.shape[0], weight.d.shape[0]
    out = np.empty((n, n_out), dtype=np.float32)
    split_rows(_matmul_parallel, _matmul, (weight.q, weight.d, weight.offset, blocks.qs, blocks.d, out), n_out,
               work=n * n_out * weight.q.shape[1])
    return out


def matmul_q4_0(x: np.ndarray | Q8Blocks, weight: RepackedWeight | LaneWeight) -> np.ndarray:
    """float32 ``x`` ``[n, k]`` (or its q8_0 blocks) times a Q4_0 weight (``split_q4_0`` of ``[out, k]``): ``[n, out]``.

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import dequantize, quantize
    >>> raw = quantize(np.linspace(-1, 1, 512, dtype=np.float32).reshape(8, 64), T.Q4_0)
    >>> x = np.linspace(-1, 1, 64, dtype=np.float32)[None]
    >>> bool(np.allclose(matmul_q4_0(x, split_q4_0(raw)), x @ dequantize(raw, T.Q4_0).T, atol=0.05))
    True
    """
    return matmul_lanes(x, weight) if isinstance(weight, LaneWeight) else matmul_repacked(x, weight)
