"""ggml's 8-lane integer dot of one 32-byte block, as LLVM vector code for the numba kernels: ``q8_0_lane_dot``,
``q5_0_lane_dot`` and ``q4_1_lane_dot`` run a whole row of Q8_0 / Q5_0 / Q4_1 blocks against q8 activations in ymm
registers, reading the raw GGUF blocks in place (``BlockLayout``: the file stays memory-mapped, nothing is
unpacked at load); ``lane_dot`` reads weights unpacked to a byte each (``LaneWeight``: Q4_0, Q5_1, IQ4_NL).

ggml's AVX2 kernels multiply a block's 32 weight bytes with its 32 activation bytes into 8 int32 lanes, lane ``l``
holding the exact sum of elements ``4l .. 4l+3`` (``maddubs`` then ``madd``), then per block
``acc = fma(d_w*d_x, float(lanes), acc)`` on 8 float lanes and ``hsum8`` at the end. The integer sums are exact
whichever instructions form them, so here each weight byte is formed unsigned, ``q`` with the weight
``q - offset`` (Q8_0: the int8 with its top bit flipped, offset 128; Q5_0: ``nibble | fifth_bit << 4``, offset 16;
Q4_1: the nibble, offset 0), one ``vpdpbusd`` (AVX-VNNI: unsigned x signed bytes, 4 products per int32 lane,
exactly ggml's lanes) forms ``sum q*x`` and the offset comes back as ``offset * sum x`` per lane. Without VNNI the
same sums come from widened multiplies that LLVM vectorizes. The float part is ggml's instruction for instruction:
the block's fp16 ``d_w`` widened exactly, a float32 ``d_w*d_x``, one ``llvm.fma.v8f32`` per block.

Prefill takes activation rows four at a time (rows laid out by ``interleave4``) in ``lane_tiles``' register tiles.

``lanes_reference`` is the same lane sum in numpy (tests compare against it).
"""
from __future__ import annotations

from typing import NamedTuple

import llvmlite.binding as llvm_binding
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic


def _target_features() -> dict[str, bool]:
    """The CPU features numba compiles for: the host's, or ``NUMBA_CPU_FEATURES`` (``+avx2,+fma,...``; with
    ``NUMBA_CPU_NAME=haswell`` the kernels an AVX2-only CPU runs, on any x86 machine)."""
    if config.CPU_FEATURES is not None:
        return {f[1:]: f[0] == "+" for f in config.CPU_FEATURES.split(",") if f}
    return dict(llvm_binding.get_host_cpu_features())


_FEATURES = _target_features()
# vpdpbusd on ymm: AVX-VNNI (VEX) or AVX512-VNNI with AVX512VL (EVEX); same intrinsic in LLVM
HAS_VNNI = bool(_FEATURES.get("avxvnni") or (_FEATURES.get("avx512vnni") and _FEATURES.get("avx512vl")))
OUT_TILE = 16  # output rows a prefill matmul takes together: 16 float32 outputs of an activation row = a cache line
HAS_VNNI_512 = bool(_FEATURES.get("avx512vnni") and _FEATURES.get("avx512f"))  # vpdpbusd on zmm: two blocks at once

_I8, _I32, _F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
V32I8, V8I32, V8F32 = ir.VectorType(_I8, 32), ir.VectorType(_I32, 8), ir.VectorType(_F32, 8)
V64I8, V16I32, V16F32 = ir.VectorType(_I8, 64), ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)
V32I32 = ir.VectorType(_I32, 32)
_CONCAT = ir.Constant(V32I32, list(range(32)))  # two 16-byte vectors -> one of 32


def lanes_reference(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Unsigned bytes ``q`` and signed bytes ``x`` (same shape, last axis a multiple of 4) -> int32 sums of each 4
    consecutive products (the lanes ``lane_sums`` builds).

    >>> lanes_reference(np.arange(8, dtype=np.uint8), np.ones(8, np.int8)).tolist()
    [6, 22]
    """
    products = q.astype(np.int32) * x.astype(np.int32)
    return products.reshape(*q.shape[:-1], -1, 4).sum(axis=-1, dtype=np.int32)


def lane_sums(builder: ir.IRBuilder, q: ir.Value, x: ir.Value, vnni: bool = HAS_VNNI) -> ir.Value:
    """IR: ``<32 x i8>`` unsigned ``q`` and signed ``x`` -> ``<8 x i32>``, lane ``l`` = sum of products 4l..4l+3."""
    if vnni:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V8I32, [V8I32] * 3),
                                            "llvm.x86.avx512.vpdpbusd.256")
        return builder.call(fn, [ir.Constant(V8I32, None), builder.bitcast(q, V8I32), builder.bitcast(x, V8I32)])
    wide = ir.VectorType(_I32, 32)
    products = builder.mul(builder.zext(q, wide), builder.sext(x, wide))
    total = None
    for k in range(4):
        part = builder.shuffle_vector(products, products, ir.Constant(V8I32, [4 * i + k for i in range(8)]))
        total = part if total is None else builder.add(total, part)
    return total


def lane_sums_pair(builder: ir.IRBuilder, q: ir.Value, x: ir.Value, vnni_512: bool = HAS_VNNI_512) -> ir.Value:
    """IR: ``lane_sums`` of two blocks side by side: ``<64 x i8>`` -> ``<16 x i32>`` (one zmm ``vpdpbusd`` with
    AVX512-VNNI, else two of 32 bytes)."""
    if vnni_512:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V16I32, [V16I32] * 3),
                                            "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [ir.Constant(V16I32, None), builder.bitcast(q, V16I32), builder.bitcast(x, V16I32)])
    halves = [[builder.shuffle_vector(v, v, ir.Constant(V32I32, list(range(32 * h, 32 * h + 32)))) for v in (q, x)]
              for h in range(2)]
    low, high = (lane_sums(builder, qh, xh) for qh, xh in halves)
    return builder.shuffle_vector(low, high, ir.Constant(V16I32, list(range(16))))


def data_pointer(context, builder: ir.IRBuilder, array_type, value: ir.Value) -> ir.Value:
    """IR: the data pointer of a numba array argument."""
    return context.make_array(array_type)(context, builder, value).data


def load_vector(builder: ir.IRBuilder, pointer: ir.Value, index: ir.Value, vector_type: ir.VectorType,
                plus: int = 0) -> ir.Value:
    """IR: an unaligned vector load of ``pointer[index + plus:index + plus + len]``."""
    if plus:
        index = builder.add(index, ir.Constant(index.type, plus))
    return builder.load(builder.bitcast(builder.gep(pointer, [index]), vector_type.as_pointer()), align=1)


def offset(builder: ir.IRBuilder, start: ir.Value, index: ir.Value, stride: int) -> ir.Value:
    """IR: ``start + index * stride``."""
    return builder.add(start, builder.mul(index, ir.Constant(index.type, stride)))


def splat(builder: ir.IRBuilder, value: ir.Value, vector_type: ir.VectorType = V8F32) -> ir.Value:
    """IR: ``value`` in every lane."""
    vector = builder.insert_element(ir.Constant(vector_type, None), value, ir.Constant(_I32, 0))
    zeros = ir.Constant(ir.VectorType(_I32, vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(vector, vector, zeros)


def fma_v8(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    """IR: ``llvm.fma.v8f32`` (``_mm256_fmadd_ps``)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V8F32, [V8F32] * 3), "llvm.fma.v8f32")
    return builder.call(fn, [a, b, c])


def fma_v16(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    """IR: ``llvm.fma.v16f32`` (two rows' 8 lanes, each lane its own fma)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V16F32, [V16F32] * 3), "llvm.fma.v16f32")
    return builder.call(fn, [a, b, c])


def fma_f32(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    """IR: ``llvm.fma.f32`` (one rounding)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32] * 3), "llvm.fma.f32")
    return builder.call(fn, [a, b, c])


def reduce_add(builder: ir.IRBuilder, vector: ir.Value) -> ir.Value:
    """IR: the sum of an integer vector's lanes (exact in any order)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector.type.element, [vector.type]),
                                        f"llvm.vector.reduce.add.v{vector.type.count}i{vector.type.element.width}")
    return builder.call(fn, [vector])


def hsum8_ir(builder: ir.IRBuilder, acc: ir.Value) -> ir.Value:
    """IR of ``simd.hsum8`` on an ``<8 x float>``: ((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7))."""
    a = [builder.extract_element(acc, ir.Constant(_I32, i)) for i in range(8)]
    t = [builder.fadd(a[i], a[i + 4]) for i in range(4)]
    return builder.fadd(builder.fadd(t[0], t[2]), builder.fadd(t[1], t[3]))


def split_nibbles(builder: ir.IRBuilder, packed: ir.Value) -> tuple[ir.Value, ir.Value]:
    """IR: bytes -> (their low nibbles, their high nibbles), same vector type."""
    n = packed.type.count
    low = builder.and_(packed, ir.Constant(packed.type, [15] * n))
    return low, builder.lshr(packed, ir.Constant(packed.type, [4] * n))


class BlockLayout(NamedTuple):
    """How the lane kernels read a weight's blocks of 32: in place as the GGUF stores them (memory-mapped;
    ``block_bytes`` each), or ``UNPACKED`` (``LaneWeight``: a byte per weight plus a float32 scale array). The
    unsigned byte the kernel forms is the weight plus ``offset`` (``offset * sum x`` per lane is subtracted again:
    the ``corr`` argument; none for offset 0; ``LaneWeight`` carries its own)."""

    name: str
    block_bytes: int
    offset: int | None


# Q8_0: fp16 d, 32 int8 (the byte with its top bit flipped is the weight + 128); Q5_0: fp16 d, 32 fifth bits, 16
# bytes of nibbles (ggml's ``q | h<<4``, weight + 16); Q4_1: fp16 d, fp16 m, 16 bytes of nibbles (weight d*q + m)
Q8_0_BLOCK, Q5_0_BLOCK = BlockLayout("q8_0", 34, 128), BlockLayout("q5_0", 22, 16)
Q4_1_BLOCK = BlockLayout("q4_1", 20, 0)
UNPACKED = BlockLayout("unpacked", 32, None)


def nibble_bytes(builder: ir.IRBuilder, pointer: ir.Value, index: ir.Value) -> ir.Value:
    """IR: 16 packed bytes at ``pointer[index]`` -> 32 bytes, their low nibbles then their high nibbles (ggml's
    element ``i`` and ``16 + i``)."""
    low, high = split_nibbles(builder, load_vector(builder, pointer, index, ir.VectorType(_I8, 16)))
    return builder.shuffle_vector(low, high, _CONCAT)


def load_fp16(builder: ir.IRBuilder, pointer: ir.Value, index: ir.Value) -> ir.Value:
    """IR: the fp16 at byte ``pointer[index]`` widened (exactly) to float32 (``GGML_FP16_TO_FP32``)."""
    half = builder.bitcast(builder.gep(pointer, [index]), ir.HalfType().as_pointer())
    return builder.fpext(builder.load(half, align=1), _F32)


def _weight_block(builder: ir.IRBuilder, layout: BlockLayout, weight: list[ir.Value], block: ir.Value):
    """IR: (the 32 unsigned weight bytes of ``block``, its float32 scale); ``weight`` is (raw pointer, the row's first
    byte), or for ``UNPACKED`` (values pointer, start, scales pointer, start)."""
    if layout is UNPACKED:
        q, q0, wd, wd0 = weight
        return (load_vector(builder, q, offset(builder, q0, block, 32), V32I8),
                builder.load(builder.gep(wd, [builder.add(wd0, block)])))
    raw, raw0 = weight
    base = offset(builder, raw0, block, layout.block_bytes)

    def at(k):
        return builder.add(base, ir.Constant(base.type, k))

    scale = load_fp16(builder, raw, base)
    if layout is Q8_0_BLOCK:
        return builder.xor(load_vector(builder, raw, at(2), V32I8), ir.Constant(V32I8, [128] * 32)), scale
    if layout is Q4_1_BLOCK:
        return nibble_bytes(builder, raw, at(4)), scale
    high = builder.load(builder.bitcast(builder.gep(raw, [at(2)]), _I32.as_pointer()), align=1)
    fifth = builder.zext(builder.bitcast(high, ir.VectorType(ir.IntType(1), 32)), V32I8)  # bit j: element j's
    return builder.or_(nibble_bytes(builder, raw, at(6)), builder.shl(fifth, ir.Constant(V32I8, [4] * 32))), scale


def _operands(context, builder: ir.IRBuilder, signature, args, layout: BlockLayout):
    """(weight operands for ``_weight_block``, x pointer, x start, xd pointer, xd start, (corr pointer, start) or
    None): the intrinsics' arguments in order; ``corr`` unless the layout's offset is 0."""
    arrays = signature.args

    def pointer(i):
        return data_pointer(context, builder, arrays[i], args[i])

    n = 4 if layout is UNPACKED else 2
    weight = [pointer(i) if i % 2 == 0 else args[i] for i in range(n)]
    corr = (pointer(n + 4), args[n + 5]) if layout.offset != 0 else None
    return weight, pointer(n), args[n + 1], pointer(n + 2), args[n + 3], corr


# how far ahead of the block being read a decode matvec asks for the weight bytes: a decode step streams every
# weight once, and the hardware prefetcher alone left it waiting on memory (a 3072x576 Q4_1 matvec over 40
# weights not in cache, this Intel Xeon: 101.7 -> 76.1 us median, 4096 bytes ahead; 2048: 76.2, 8192: 71.5)
PREFETCH_BYTES = 4096


def prefetch(builder: ir.IRBuilder, pointer: ir.Value, index: ir.Value, ahead: int) -> None:
    """IR: ``llvm.prefetch`` (read, keep in all cache levels) of ``pointer[index + ahead]``: a hint, never a fault,
    so it may point past the end."""
    byte_pointer = ir.IntType(8).as_pointer()
    signature = ir.FunctionType(ir.VoidType(), [byte_pointer, _I32, _I32, _I32])
    fn = cgutils.get_or_insert_function(builder.module, signature, "llvm.prefetch.p0")
    address = builder.bitcast(builder.gep(pointer, [builder.add(index, ir.Constant(index.type, ahead))]), byte_pointer)
    builder.call(fn, [address, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _row_dot(layout: BlockLayout, n_rows: int):
    """The lane dot of one row of ``layout`` blocks with ``n_rows`` consecutive activation rows: each weight block is
    loaded once for all of them. (Interleaving weight rows instead made a decode step's large matmuls slower:
    5.9 -> 10.7 ms for Gemma's 262144x640 output.)"""

    def codegen(context, builder, signature, args):
        weight, x_ptr, x0, xd_ptr, xd0, corr = _operands(context, builder, signature, args, layout)
        n_blocks = args[-2]
        # row r of the activations starts n_blocks blocks after row r - 1
        row = [builder.mul(n_blocks, ir.Constant(n_blocks.type, r)) for r in range(n_rows)]
        accs = [cgutils.alloca_once_value(builder, ir.Constant(V8F32, None)) for _ in range(n_rows)]
        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            if layout is not UNPACKED:
                prefetch(builder, weight[0], offset(builder, weight[1], b, layout.block_bytes), PREFETCH_BYTES)
            q_bytes, w_d = _weight_block(builder, layout, weight, b)
            for r, acc in enumerate(accs):
                rb = builder.add(row[r], b)  # block b of row r
                lanes = lane_sums(builder, q_bytes, load_vector(builder, x_ptr, offset(builder, x0, rb, 32), V32I8))
                if corr is not None:
                    lanes = builder.sub(lanes, load_vector(builder, corr[0], offset(builder, corr[1], rb, 8), V8I32))
                d = builder.fmul(w_d, builder.load(builder.gep(xd_ptr, [builder.add(xd0, rb)])))
                builder.store(fma_v8(builder, splat(builder, d), builder.sitofp(lanes, V8F32), builder.load(acc)),
                              acc)
        sums = [hsum8_ir(builder, builder.load(acc)) for acc in accs]
        return sums[0] if n_rows == 1 else context.make_tuple(builder, signature.return_type, sums)

    return codegen


_NO_GROUPS: dict[tuple, np.ndarray] = {}


def interleave4(a: np.ndarray) -> np.ndarray:
    """Rows ``[n, nb, ...]`` -> ``[n // 4, nb, 4, ...]`` (the first ``n - n % 4`` rows): block ``b`` of 4
    consecutive rows side by side, as ``lane_tiles.tile_dot`` reads them."""
    groups = a.shape[0] // 4
    if groups == 0:  # decode: nothing to lay out (one shared empty array: no numpy work per call)
        key = (a.dtype, a.shape[2:])
        if key not in _NO_GROUPS:
            _NO_GROUPS[key] = np.empty((0, 0, 4, *a.shape[2:]), dtype=a.dtype)
        return _NO_GROUPS[key]
    moved = a[:4 * groups].reshape(groups, 4, *a.shape[1:])
    return np.ascontiguousarray(np.moveaxis(moved, 1, 2))


def _rows(n_rows) -> int | None:
    return n_rows.literal_value if isinstance(n_rows, types.IntegerLiteral) and n_rows.literal_value > 0 else None


def _result(rows: int) -> types.Type:
    return types.float32 if rows == 1 else types.UniTuple(types.float32, rows)


def _lane_dot(layout: BlockLayout):
    """The intrinsic ``hsum8`` of ggml's per-block ``acc = fma(d_w[b]*xd[b], float(lanes_b - corr_b), acc)`` over
    ``n_blocks`` blocks of ``layout``. Arguments, all arrays 1-D with a start index: the weight row (``raw`` uint8
    and the row's first byte; ``UNPACKED``: ``q`` uint8, start, ``wd`` float32 scales, start), ``x`` int8
    activations, ``xd`` their float32 scales, ``corr`` int32 (8 per block: ``offset * sum x`` of each lane; not for
    a layout with offset 0), then ``n_blocks`` and ``n_rows`` (a constant: consecutive activation rows at once):
    a float32, or a tuple of ``n_rows``."""

    def typer(*args):
        rows = _rows(args[-1])
        return None if rows is None else (_result(rows)(*args), _row_dot(layout, rows))

    if layout is UNPACKED:
        def dot(typingctx, q, q0, wd, wd0, x, x0, xd, xd0, corr, corr0, n_blocks, n_rows):
            return typer(q, q0, wd, wd0, x, x0, xd, xd0, corr, corr0, n_blocks, n_rows)
    elif layout.offset:
        def dot(typingctx, raw, raw0, x, x0, xd, xd0, corr, corr0, n_blocks, n_rows):
            return typer(raw, raw0, x, x0, xd, xd0, corr, corr0, n_blocks, n_rows)
    else:
        def dot(typingctx, raw, raw0, x, x0, xd, xd0, n_blocks, n_rows):
            return typer(raw, raw0, x, x0, xd, xd0, n_blocks, n_rows)

    return intrinsic(dot)


lane_dot, q8_0_lane_dot, q5_0_lane_dot, q4_1_lane_dot = (_lane_dot(layout) for layout in
                                                          (UNPACKED, Q8_0_BLOCK, Q5_0_BLOCK, Q4_1_BLOCK))


@intrinsic
def fp16_at(typingctx, raw, index):
    """The fp16 at byte ``raw[index]`` (``raw`` a 1-D uint8 array) as a float32."""
    def codegen(context, builder, signature, args):
        return load_fp16(builder, data_pointer(context, builder, signature.args[0], args[0]), args[1])

    return types.float32(raw, index), codegen


class LaneWeight(NamedTuple):
    """A weight unpacked to a byte per weight (``UNPACKED``: Q4_0, Q5_1, IQ4_NL, whose repacked or vec_dot paths
    need it): ``q`` uint8 ``[out, k]`` in element order (the weight value is ``q - offset``), ``d`` the float32 block
    scales ``[out, k/32]``."""

    q: np.ndarray
    d: np.ndarray
    offset: int
