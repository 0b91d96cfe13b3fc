"""``x @ W.T`` for an IQ4_NL weight as ggml computes it on AVX2 (q8_0 activations), by row count as for Q4_0:

- a multiple of 8: repacked (``iq4_nl_8x8_q8_0``), ``gemv/gemm_q4_b32_8x8_q8_0_lut_avx`` with the IQ4_NL table:
  one float accumulator per output, ``acc = fma(float(sum v * q8), d_w * d_x, acc)`` per block
  (``dot_q4_0.matmul_repacked``).
- otherwise, one activation row: ``ggml_vec_dot_iq4_nl_q8_0`` (arch/x86/quants.c): 8 int lanes per block (lane
  ``l``: elements ``4l..4l+3``), even blocks into ``acc1``, odd ones into ``acc2`` (``fma(d_w*d_x, lane, acc)``),
  then ``hsum8(acc1 + acc2)``; two or more rows: ``tinyBLAS_Q0_AVX<block_iq4_nl>``, the Q8_0 kernel's one chain of
  8 lanes (``dot_q8_0.matmul_lanes``).

An IQ4_NL block (18 bytes) is an fp16 scale and 16 bytes of nibbles (element ``i < 16`` the low nibble of byte
``i``, ``16 + i`` its high nibble) indexing ``KVALUES``; the weight is ``d * KVALUES[q]``. Values are kept as
``KVALUES[q] + 128`` (unsigned bytes for ``vpdpbusd``; the lanes take the 128 back).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from rocmforge.errors import UnsupportedError
from rocmforge.exact.dot_q4_0 import REPACK_ROWS, RepackedWeight, matmul_repacked
from rocmforge.exact.dot_q8_0 import matmul_lanes
from rocmforge.exact.lanes import (OUT_TILE, V8F32, V32I8, LaneWeight, data_pointer, fma_v8, hsum8_ir, lane_sums,
                                   load_vector, offset, splat)
from rocmforge.exact.q8_activations import Q8Blocks, quantize_q8
from rocmforge.exact.threads import split_rows

BLOCK_BYTES = 18
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int16)
OFFSET = 128


class IQ4NLLanes(NamedTuple):
    """An IQ4_NL weight llama.cpp does not repack (rows not a multiple of 8)."""

    lanes: LaneWeight


def split_iq4_nl(raw: np.ndarray) -> RepackedWeight | IQ4NLLanes:
    """Raw IQ4_NL rows ``[out, bytes]`` -> what ``matmul_iq4_nl`` takes.

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import dequantize
    >>> raw = np.random.default_rng(0).integers(0, 256, (8, 2 * BLOCK_BYTES), dtype=np.uint8)
    >>> raw.reshape(8, 2, BLOCK_BYTES)[..., :2] = np.array([0.01], np.float16).view(np.uint8)
    >>> q, d, offset = split_iq4_nl(raw)
    >>> bool(np.array_equal((q.reshape(8, 2, 32) - 128.0) * d[..., None], dequantize(raw, T.IQ4_NL).reshape(8, 2, 32)))
    True
    """
    blocks = np.asarray(raw).reshape(raw.shape[0], -1, BLOCK_BYTES)
    if blocks.shape[1] % 2:
        raise UnsupportedError("device='cpu-exact': IQ4_NL rows of an odd number of blocks (ggml's scalar tail) "
                               "have no exact kernel; use device='cpu'")
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., 2:]
    codes = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(raw.shape[0], -1)
    q = (KVALUES + OFFSET).astype(np.uint8)[codes]
    if raw.shape[0] % REPACK_ROWS == 0:
        return RepackedWeight(q, d, OFFSET)
    return IQ4NLLanes(LaneWeight(q, d, OFFSET))


@intrinsic
def _vec_dot(typingctx, q, q0, wd, wd0, x, x0, xd, xd0, n_blocks):
    """IR: ``ggml_vec_dot_iq4_nl_q8_0`` of one output: blocks alternately into two 8-lane accumulators."""

    def codegen(context, builder, signature, args):
        q_ptr, wd_ptr, x_ptr, xd_ptr = (data_pointer(context, builder, signature.args[i], args[i]) for i in (0, 2, 4, 6))
        q0, wd0, x0, xd0, n = args[1], args[3], args[5], args[7], args[8]
        accs = [cgutils.alloca_once_value(builder, ir.Constant(V8F32, None)) for _ in range(2)]
        offsets = ir.Constant(V32I8, [OFFSET] * 32)
        pairs = builder.udiv(n, ir.Constant(n.type, 2))
        with cgutils.for_range(builder, pairs) as loop:
            for j, acc in enumerate(accs):
                b = builder.add(builder.mul(loop.index, ir.Constant(n.type, 2)), ir.Constant(n.type, j))
                x_bytes = load_vector(builder, x_ptr, offset(builder, x0, b, 32), V32I8)
                q_bytes = load_vector(builder, q_ptr, offset(builder, q0, b, 32), V32I8)
                lanes = builder.sub(lane_sums(builder, q_bytes, x_bytes), lane_sums(builder, offsets, x_bytes))
                scale = builder.fmul(builder.load(builder.gep(xd_ptr, [builder.add(xd0, b)])),
                                     builder.load(builder.gep(wd_ptr, [builder.add(wd0, b)])))
                builder.store(fma_v8(builder, splat(builder, scale), builder.sitofp(lanes, V8F32),
                                     builder.load(acc)), acc)
        return hsum8_ir(builder, builder.fadd(builder.load(accs[0]), builder.load(accs[1])))

    return types.float32(q, q0, wd, wd0, x, x0, xd, xd0, n_blocks), codegen


@njit(cache=True, nogil=True)
def _matvec(q, wd, xq, xd, out, start, stop):  # pragma: no cover - compiled
    # one activation row (decode), output rows start..stop
    nb = wd.shape[1]
    q_flat, wd_flat, x_flat, xd_flat = q.reshape(-1), wd.reshape(-1), xq.reshape(-1), xd.reshape(-1)
    for o0 in range(start, stop, OUT_TILE):
        for r in range(xq.shape[0]):
            for o in range(o0, min(o0 + OUT_TILE, stop)):
                out[r, o] = _vec_dot(q_flat, o * nb * 32, wd_flat, o * nb, x_flat, r * nb * 32, xd_flat, r * nb, nb)


@njit(cache=True, parallel=True)
def _matvec_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of output rows per thread (threads.split_rows)
        _matvec(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)


def matmul_iq4_nl(x: np.ndarray | Q8Blocks, weight: RepackedWeight | IQ4NLLanes) -> np.ndarray:
    """float32 ``x`` ``[n, k]`` (or its q8_0 blocks) times an IQ4_NL weight (``split_iq4_nl``): ``[n, out]``.

    >>> import numpy as np
    >>> from gguf import GGMLQuantizationType as T
    >>> from gguf.quants import dequantize
    >>> raw = np.random.default_rng(0).integers(0, 256, (6, 2 * BLOCK_BYTES), dtype=np.uint8)
    >>> raw.reshape(6, 2, BLOCK_BYTES)[..., :2] = np.array([0.01], np.float16).view(np.uint8)
    >>> x = np.linspace(-1, 1, 64, dtype=np.float32)[None]
    >>> bool(np.allclose(matmul_iq4_nl(x, split_iq4_nl(raw)), x @ dequantize(raw, T.IQ4_NL).T, atol=0.05))
    True
    """
    if isinstance(weight, RepackedWeight):
        return matmul_repacked(x, weight)
    blocks = x if isinstance(x, Q8Blocks) else quantize_q8(x, with_sum=False)
    if blocks.qs.shape[0] >= 2:
        return matmul_lanes(blocks, weight.lanes)
    q, d, _ = weight.lanes
    out = np.empty((1, d.shape[0]), dtype=np.float32)
    split_rows(_matvec_parallel, _matvec, (q, d, blocks.qs, blocks.d, out), d.shape[0], work=q.size)
    return out
