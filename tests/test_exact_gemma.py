"""``device="cpu-exact"`` for Gemma 3: the kernels Gemma needs beyond the llama family (Q5_0 through the Q8_0 path,
Q8_K activations, Q6_K by ``vec_dot`` and by the tiled matmul, repacked Q4_K by GEMM and GEMV rows, GeGLU's fp16
table) each against an independent reference (the real Gemma-3-270M against llama.cpp's stored fixtures is in
tests/test_exact.py, beside SmolLM2).

References unpack the GGUF bytes as ggml's ``dequantize_row_*`` C code does, in pure Python, and replay ggml's
order one IEEE operation at a time, with a fused multiply-add rounded once from exact rationals
(``ggml_order.fma``); the integer parts are also checked against plain integer dot products.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from ggml_order import fma, hsum8
from rocmforge.errors import UnsupportedError
from rocmforge.exact.dot_q4_k import matmul_q4_k, split_q4_k
from rocmforge.exact.dot_q5_0 import matmul_q5_0, split_q5_0
from rocmforge.exact.dot_q6_k import matmul_q6_k, split_q6_k
from rocmforge.exact.geglu import geglu, gelu_table
from rocmforge.exact.q8_activations import quantize_q8
from rocmforge.exact.q8_k_activations import quantize_q8_k

pytestmark = pytest.mark.model_text  # stored references: .ci/run repeats it under another BLAS kernel

FIXTURES = Path(__file__).parent / "fixtures"
f32 = np.float32
RNG = np.random.default_rng(11)


def _fp16(raw: np.ndarray, at: int) -> np.float32:
    return f32(raw[at:at + 2].view(np.float16)[0])


def _random_blocks(rows: int, n_blocks: int, block_bytes: int, fp16_fields: dict[int, float]) -> np.ndarray:
    """Random GGUF blocks with sane fp16 scales at the given byte offsets (random bytes elsewhere)."""
    raw = RNG.integers(0, 256, (rows, n_blocks, block_bytes), dtype=np.uint8)
    for offset, scale in fp16_fields.items():
        scales = (RNG.uniform(0.5, 1.5, (rows, n_blocks, 1)) * scale).astype(np.float16)
        raw[..., offset:offset + 2] = scales.view(np.uint8)
    return raw.reshape(rows, -1)


# --- Q5_0 ------------------------------------------------------------------------------------------------------
def _q5_0_ints(block: np.ndarray) -> list[int]:
    """dequantize_row_q5_0 (ggml-quants.c) without the scale: 32 values in [-16, 15]."""
    qh = int.from_bytes(block[2:6].tobytes(), "little")
    qs = block[6:22]
    low = [((int(qs[j]) & 0x0F) | (((qh >> j) << 4) & 0x10)) - 16 for j in range(16)]
    high = [((int(qs[j]) >> 4) | ((qh >> (j + 12)) & 0x10)) - 16 for j in range(16)]
    return low + high


def test_q5_0_raw_blocks_take_the_q8_0_lane_path():
    """The raw blocks, read in place (no copy), through ggml's Q8_0 lanes: activation rows 4 at a time (prefill)
    and alone; 19 outputs: a tile of 16 and a part."""
    w = RNG.standard_normal((19, 64)).astype(f32)
    raw = quantize(w, T.Q5_0)
    raw[1, 2:6] = 255  # every fifth bit set in the first block of row 1
    weight = split_q5_0(raw)
    assert weight.raw is raw
    x = RNG.standard_normal((5, 64)).astype(f32)
    blocks = quantize_q8(x, with_sum=False)
    out = matmul_q5_0(blocks, weight)
    for o, r in np.ndindex(19, 5):
        acc = [f32(0)] * 8
        for b in range(2):
            wq = _q5_0_ints(raw[o, 22 * b: 22 * b + 22])
            lanes = [sum(wq[i] * int(blocks.qs[r, b, i]) for i in range(4 * lane, 4 * lane + 4)) for lane in range(8)]
            d = _fp16(raw[o], 22 * b) * blocks.d[r, b]
            acc = [fma(d, lanes[lane], acc[lane]) for lane in range(8)]
        assert out[r, o] == hsum8(acc), (r, o)
    assert np.array_equal(matmul_q5_0(x[4:5], weight), out[4:5])


# --- Q8_K activations -------------------------------------------------------------------------------------------
def _q8_k_ref(x: np.ndarray) -> tuple[list[int], np.float32, list[int]]:
    """quantize_row_q8_K_ref for one 256-block: first largest magnitude, -127/max, nearest_int by the 1.5*2^23 trick."""
    amax, signed_max = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, signed_max = abs(v), v
    if amax == 0:
        return [0] * 256, f32(0), [0] * 16
    iscale = f32(-127) / signed_max
    q = []
    for v in x:
        bits = int(np.array([iscale * v + f32(12582912)], f32).view(np.int32)[0])
        q.append(min(127, (bits & 0x007FFFFF) - 0x00400000))
    return q, f32(1) / iscale, [sum(q[16 * j:16 * j + 16]) for j in range(16)]


def test_q8_k_activation_blocks():
    x = (RNG.standard_normal((3, 512)) * [[1], [1e-3], [40]]).astype(f32)
    x[1, :256] = 0                          # an all-zero block
    x[2, 256:] = np.round(x[2, 256:])       # ties for nearest_int
    x[2, 300], x[2, 400] = -500, 500        # -max before +max: the sign of the scale follows the first
    blocks = quantize_q8_k(x)
    for r, b in np.ndindex(3, 2):
        q, d, bsums = _q8_k_ref(x[r, 256 * b: 256 * b + 256])
        assert blocks.qs[r, b].tolist() == q and blocks.d[r, b] == d and blocks.bsums[r, b].tolist() == bsums
    assert blocks.d[2, 1] > 0 and blocks.qs[2, 1, 300 - 256] == -127


def _assert_close_to_float64(out: np.ndarray, blocks, w: np.ndarray) -> None:
    """The exact kernel's float32 result is the float64 product of the rounded operands up to float32 rounding."""
    x = (blocks.qs * blocks.d[..., None].astype(np.float64)).reshape(blocks.qs.shape[0], -1)
    w = w.astype(np.float64)
    assert np.all(np.abs(out - x @ w.T) <= 1e-5 * (np.abs(x) @ np.abs(w).T))


# --- Q6_K -------------------------------------------------------------------------------------------------------
def _q6_k_ints(block: np.ndarray) -> tuple[list[int], list[int], np.float32]:
    """dequantize_row_q6_K without the scales: (unsigned q in [0, 64) per weight, its scale, d)."""
    ql, qh, sc = block[:128].astype(int), block[128:192].astype(int), block[192:208].view(np.int8).astype(int)
    q, scale = [0] * 256, [0] * 256
    for half in range(2):
        for ll in range(32):
            y, is_ = 128 * half + ll, 8 * half + ll // 16
            ql_, qh_ = ql[64 * half:], qh[32 * half:]
            q[y] = (ql_[ll] & 0xF) | (((qh_[ll] >> 0) & 3) << 4)
            q[y + 32] = (ql_[ll + 32] & 0xF) | (((qh_[ll] >> 2) & 3) << 4)
            q[y + 64] = (ql_[ll] >> 4) | (((qh_[ll] >> 4) & 3) << 4)
            q[y + 96] = (ql_[ll + 32] >> 4) | (((qh_[ll] >> 6) & 3) << 4)
            for k in range(4):
                scale[y + 32 * k] = int(sc[is_ + 2 * k])
    return q, scale, _fp16(block, 208)


@pytest.mark.parametrize("n_rows", [3, 9])
def test_q6_k_vec_dot_lanes_and_tiled_blocks(n_rows):
    """Fewer than 8 rows: vec_dot_q6_K_q8_K's 8 lanes; 8 or more: the tiled matmul's one fma per super-block."""
    raw = _random_blocks(2, 2, 210, {208: 0.01})
    x = RNG.standard_normal((n_rows, 512)).astype(f32)
    blocks = quantize_q8_k(x)
    out = matmul_q6_k(blocks, split_q6_k(raw))
    for o, r in np.ndindex(2, n_rows):
        acc = [f32(0)] * 8
        for b in range(2):
            q, scale, d = _q6_k_ints(raw[o, 210 * b: 210 * b + 210])
            xq, bsums = blocks.qs[r, b].astype(int), blocks.bsums[r, b]
            sc = raw[o, 210 * b + 192: 210 * b + 208].view(np.int8).astype(int)
            lanes = [0] * 8
            for e in range(256):  # lane l owns elements 4l..4l+3 of every 32; the -32 comes back through bsums
                lanes[(e % 32) // 4] += scale[e] * q[e] * xq[e]
            lanes = [lanes[i] - 32 * (bsums[2 * i] * sc[2 * i] + bsums[2 * i + 1] * sc[2 * i + 1]) for i in range(8)]
            assert sum(lanes) == sum(scale[e] * (q[e] - 32) * xq[e] for e in range(256))
            if n_rows >= 8:
                acc[0] = fma(d * f32(sum(lanes)), blocks.d[r, b], acc[0])
            else:
                acc = [fma(blocks.d[r, b] * d, lanes[i], acc[i]) for i in range(8)]
        assert out[r, o] == (acc[0] if n_rows >= 8 else hsum8(acc)), (r, o)
    _assert_close_to_float64(out, blocks, dequantize(raw, T.Q6_K))


# --- Q4_K (repacked) --------------------------------------------------------------------------------------------
def _scale_min_k4(j: int, s: np.ndarray) -> tuple[int, int]:
    s = s.astype(int)
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def _q4_k_ints(block: np.ndarray) -> tuple[list[int], list[int], list[int], np.float32, np.float32]:
    """dequantize_row_q4_K without the scales: (q in [0, 16) per weight, sub-block scales, mins, d, dmin)."""
    qs = block[16:144].astype(int)
    q = []
    for j in range(4):
        q += [qs[32 * j + ll] & 0xF for ll in range(32)] + [qs[32 * j + ll] >> 4 for ll in range(32)]
    scales, mins = zip(*(_scale_min_k4(j, block[4:16]) for j in range(8)))
    return q, list(scales), list(mins), _fp16(block, 0), _fp16(block, 2)


def test_q4_k_gemm_rows_then_gemv_rows():
    """Rows 0..n-n%4 go through ggml_gemm_q4_K_8x8_q8_K (one fma per 64 weights), the rest through the GEMV (one
    per super-block)."""
    raw = _random_blocks(8, 2, 144, {0: 0.002, 2: 0.004})
    x = RNG.standard_normal((6, 512)).astype(f32)
    blocks = quantize_q8_k(x)
    out = matmul_q4_k(blocks, split_q4_k(raw))
    for o, r in np.ndindex(8, 6):
        per_fma = 64 if r < 4 else 256
        acc, acc_min = f32(0), f32(0)
        for b in range(2):
            q, scales, mins, d, dmin = _q4_k_ints(raw[o, 144 * b: 144 * b + 144])
            xq = blocks.qs[r, b].astype(int)
            for start in range(0, 256, per_fma):
                subs = range(start // 32, (start + per_fma) // 32)
                isum = sum(scales[s] * sum(q[e] * xq[e] for e in range(32 * s, 32 * s + 32)) for s in subs)
                imin = sum(mins[s] * sum(xq[32 * s: 32 * s + 32]) for s in subs)
                acc = fma(isum, d * blocks.d[r, b], acc)
                acc_min = fma(imin, dmin * blocks.d[r, b], acc_min)
        assert out[r, o] == acc - acc_min, (r, o)
    assert np.array_equal(matmul_q4_k(x[4:5], split_q4_k(raw)), out[4:5])  # a lone row (decode) is a GEMV row
    with pytest.raises(UnsupportedError, match="multiple of 8"):  # not repacked by ggml: another kernel
        split_q4_k(raw[:6])
    _assert_close_to_float64(out, blocks, dequantize(raw, T.Q4_K))


@pytest.mark.parametrize(("kind", "block_bytes", "fields"), [(T.Q4_K, 144, {0: 0.002, 2: 0.004}),
                                                              (T.Q6_K, 210, {208: 0.01})])
def test_k_quant_output_tiles_change_no_bits(kind, block_bytes, fields):
    """A matmul takes its outputs in column groups of 8: 40 outputs in one call give the bits of five calls of 8
    (each checked above against ggml's order), on both sides of the GEMM/GEMV and tiled/vec_dot switches."""
    split, multiply = (split_q4_k, matmul_q4_k) if kind == T.Q4_K else (split_q6_k, matmul_q6_k)
    raw = _random_blocks(40, 2, block_bytes, fields)
    for n_rows in (3, 10):
        x = RNG.standard_normal((n_rows, 512)).astype(f32)
        whole = multiply(x, split(raw))
        parts = np.concatenate([multiply(x, split(raw[o:o + 8])) for o in range(0, 40, 8)], axis=1)
        assert np.array_equal(whole, parts)


# --- GeGLU --------------------------------------------------------------------------------------------------------
def test_gelu_table_is_llama_cpps():
    ref = json.loads((FIXTURES / "gelu_table_f16.json").read_text())
    inputs = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = np.isfinite(inputs)
    table = gelu_table().astype(np.float16).view(np.uint16)
    assert int(finite.sum()) == ref["finite_entries"]
    assert hashlib.sha256(table[finite].tobytes()).hexdigest() == ref["sha256_finite"]
    x = inputs[finite & (np.abs(inputs) < 10)].astype(np.float64)
    exact = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(gelu_table()[(finite & (np.abs(inputs) < 10)).nonzero()[0]], exact,
                               rtol=2 ** -10, atol=2e-6)  # an fp16 rounding of the float32 formula


def test_geglu_looks_up_the_fp16_input_and_bypasses_large_ones():
    halves = np.sort(RNG.uniform(-10, 10, 300).astype(np.float16)).astype(np.float64)
    ties = ((halves[:-1] + halves[1:]) / 2).astype(f32)  # halfway between fp16 values: rounded half to even
    gate = np.concatenate([RNG.uniform(-12, 12, 500), [-10, -10.001, 10, 9.999], ties]).astype(f32)
    up = RNG.standard_normal(gate.size).astype(f32)
    out = geglu(gate, up)
    table = gelu_table()
    for g, u, y in zip(gate, up, out):
        if g <= -10:
            assert y == 0
        elif g >= 10:
            assert y == g * u
        else:
            assert y == table[np.array([g], np.float16).view(np.uint16)[0]] * u
