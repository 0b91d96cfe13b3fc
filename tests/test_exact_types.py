"""``device="cpu-exact"`` on the weight types the two real models do not use: each kernel against a pure-Python
replay of ggml's AVX2 code (``ggml_order``: one IEEE operation at a time, fused multiply-adds rounded once from
exact rationals), and a tiny model per type against llama.cpp's logits, bit for bit
(tests/fixtures/make_exact_type_fixtures.py).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

import rocmforge
from ggml_order import fma, hsum8
from rocmforge.exact.dot import MATMULS
from rocmforge.exact.dot_float import matmul_float, prepare_float, round_bf16, round_f16
from rocmforge.exact.dot_iq4_nl import KVALUES, matmul_iq4_nl
from rocmforge.exact.dot_q4_0 import matmul_q4_0
from rocmforge.exact.k_quant_lanes import LANE_MINS, SCALAR_MINS, matmul_k_quant
from rocmforge.exact.q8_activations import quantize_q8
from rocmforge.exact.q8_k_activations import quantize_q8_k

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from make_exact_type_fixtures import OUT, TYPES, decode, write_typed_model  # noqa: E402
from tiny_gguf import random_blocks  # noqa: E402

f32 = np.float32
RNG = np.random.default_rng(11)


# --- float weights ----------------------------------------------------------------------------------------------
def _vec_dot_ref(w: np.ndarray, x: np.ndarray, bf16: bool) -> np.float32:
    """ggml_vec_dot_f32/f16 (four 8-lane fma accumulators, GGML_F32x8_REDUCE) or vec_dot_bf16's AVX2 loop (the same
    accumulators, reduced in hsum_float_8's order)."""
    acc = np.zeros((4, 8), f32)
    for i in range(len(w)):
        acc[(i % 32) // 8, i % 8] = fma(w[i], x[i], acc[(i % 32) // 8, i % 8])
    lanes = [(acc[0, k] + acc[2, k]) + (acc[1, k] + acc[3, k]) for k in range(8)]
    if bf16:
        return hsum8(lanes)
    t = [lanes[i] + lanes[i + 4] for i in range(4)]
    return (t[0] + t[1]) + (t[2] + t[3])


def _tinyblas_ref(w: np.ndarray, x: np.ndarray) -> np.float32:
    acc = [f32(0)] * 8
    for i in range(len(w)):
        acc[i % 8] = fma(w[i], x[i], acc[i % 8])
    return hsum8(acc)


@pytest.mark.parametrize("ggml_type", [T.F32, T.F16, T.BF16])
def test_float_matmul_is_ggmls(ggml_type):
    """One activation row: vec_dot; three rows: tinyBLAS when the output count is a multiple of 4, else vec_dot."""
    w32 = RNG.standard_normal((8, 64)).astype(f32)
    raw = quantize(w32, ggml_type)
    weight = prepare_float(ggml_type)(raw)
    w = np.array(MATMULS[ggml_type].quantize(w32)) if ggml_type != T.F32 else w32  # the stored values
    rounding = {T.F32: lambda v: v, T.F16: round_f16, T.BF16: round_bf16}[ggml_type]
    x = rounding(RNG.standard_normal((3, 64)).astype(f32))
    bf16 = ggml_type == T.BF16
    assert np.array_equal(matmul_float(x[:1], weight), [[_vec_dot_ref(w[o], x[0], bf16) for o in range(8)]])
    assert np.array_equal(matmul_float(x, weight), [[_tinyblas_ref(w[o], x[r]) for o in range(8)] for r in range(3)])
    odd = prepare_float(ggml_type)(raw[:6])
    assert np.array_equal(matmul_float(x, odd), [[_vec_dot_ref(w[o], x[r], bf16) for o in range(6)] for r in range(3)])


def test_activation_rounding_to_half_types():
    x = np.array([1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -7e4, 1e-9], f32)  # ties, range
    with np.errstate(over="ignore"):
        assert np.array_equal(round_f16(x), x.astype(np.float16).astype(f32))
    assert round_f16(x).tolist()[:2] == [1.0, 1 + 2 ** -9]  # fp16 ties (10 mantissa bits) to even
    assert round_bf16(x).tolist()[:4] == [1.0, 1.0, 1.0, 1 + 2 ** -6]  # bf16 ties (7 mantissa bits) to even
    assert round_bf16(x)[4] == -70144.0 and np.all(np.abs(round_bf16(x) / x - 1) < 2 ** -8)


# --- K-quants ---------------------------------------------------------------------------------------------------
SCALE = {T.Q2_K: 4e-3, T.Q3_K: 1e-3, T.Q5_K: 1e-4}


def _k_quant_ref(w, o: int, xb, r: int, tiled: bool) -> np.float32:
    """One output of ggml's vec_dot (8 int lanes per super-block) or the tiled epilogue, from the unpacked codes."""
    acc, summs = ([f32(0)] * 8 if not tiled else f32(0)), f32(0)
    for b in range(w.d.shape[1]):
        values = w.q[o, b].astype(np.int64) - w.bias
        products = values * xb.qs[r, b]
        scales = w.scales[o, b].astype(np.int64)
        per16 = products.reshape(16, 16).sum(1)
        pairs = w.mins[o, b].astype(np.int64) * xb.bsums[r, b]
        wd, xd = w.d[o, b], xb.d[r, b]
        if tiled:
            res = wd * f32(int((scales * per16).sum()))
            if w.mins_kind:
                res = fma(-w.dmin[o, b], f32(int(pairs.sum())), res)
            acc = fma(res, xd, acc)
            continue
        # lane l: weights 32c + 4l .. 32c + 4l + 3 of each chunk c, scale of their 16-weight half
        lanes = (products.reshape(8, 8, 4).sum(2) * scales.reshape(8, 2).repeat(4, 1)).sum(0)
        minus_dmin = -(xd * w.dmin[o, b])
        if w.mins_kind == LANE_MINS:
            acc = [fma(minus_dmin, f32(int(pairs[2 * i] + pairs[2 * i + 1])), acc[i]) for i in range(8)]
        elif w.mins_kind == SCALAR_MINS:
            summs = fma(minus_dmin, f32(int(pairs.sum())), summs)
        acc = [fma(xd * wd, f32(int(lanes[i])), acc[i]) for i in range(8)]
    if tiled:
        return acc
    return hsum8(acc) + summs if w.mins_kind == SCALAR_MINS else hsum8(acc)


@pytest.mark.parametrize("ggml_type", [T.Q2_K, T.Q3_K, T.Q5_K])
def test_k_quant_matmul_is_ggmls(ggml_type):
    """Decode (one row: vec_dot lanes) and prefill (8 rows: the tiled kernel) over two super-blocks."""
    raw = random_blocks(ggml_type, 5, 512, RNG, scale=SCALE[ggml_type])
    weight = MATMULS[ggml_type].prepare(raw)
    x = (RNG.standard_normal((8, 512)) * 3).astype(f32)
    xb = quantize_q8_k(x)
    y = matmul_k_quant(xb, weight)
    assert np.array_equal(y, [[_k_quant_ref(weight, o, xb, r, tiled=True) for o in range(5)] for r in range(8)])
    one = quantize_q8_k(x[2:3])
    assert np.array_equal(matmul_k_quant(one, weight)[0], [_k_quant_ref(weight, o, one, 0, tiled=False)
                                                           for o in range(5)])


# --- Q4_0 ----------------------------------------------------------------------------------------------------
def test_q4_0_matmul_is_ggmls():
    """8 output rows (repacked: one fma per block over the block's exact integer sum) and 6 (vec_dot/tinyBLAS:
    8 lanes, hsum8), for one and five activation rows."""
    w = RNG.standard_normal((8, 96)).astype(f32)
    x = RNG.standard_normal((5, 96)).astype(f32)
    xb = quantize_q8(x, with_sum=False)
    for rows in (8, 6):
        raw = quantize(w[:rows], T.Q4_0)
        blocks = raw.reshape(rows, 3, 18)
        d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(f32)
        q = np.concatenate([blocks[..., 2:] & 15, blocks[..., 2:] >> 4], -1).astype(np.int64) - 8
        ref = np.zeros((5, rows), f32)
        for r, o in np.ndindex(5, rows):
            if rows == 8:
                acc = f32(0)
                for b in range(3):
                    acc = fma(f32(int(q[o, b] @ xb.qs[r, b])), d[o, b] * xb.d[r, b], acc)
            else:
                lanes = [f32(0)] * 8
                for b in range(3):
                    sums = (q[o, b] * xb.qs[r, b]).reshape(8, 4).sum(1)
                    lanes = [fma(d[o, b] * xb.d[r, b], f32(int(sums[i])), lanes[i]) for i in range(8)]
                acc = hsum8(lanes)
            ref[r, o] = acc
        weight = MATMULS[T.Q4_0].prepare(raw)
        assert np.array_equal(matmul_q4_0(x, weight), ref)
        assert np.array_equal(matmul_q4_0(x[3:4], weight), ref[3:4])


def test_iq4_nl_decode_alternates_two_accumulators():
    """Not repacked (6 rows), one activation row: even blocks' lanes into one accumulator, odd ones into another."""
    raw = random_blocks(T.IQ4_NL, 6, 128, RNG, scale=5e-4)
    x = RNG.standard_normal((1, 128)).astype(f32)
    xb = quantize_q8(x, with_sum=False)
    blocks = raw.reshape(6, 4, 18)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(f32)
    codes = np.concatenate([blocks[..., 2:] & 15, blocks[..., 2:] >> 4], -1)
    values = KVALUES[codes].astype(np.int64)
    ref = []
    for o in range(6):
        accs = [[f32(0)] * 8, [f32(0)] * 8]
        for b in range(4):
            sums = (values[o, b] * xb.qs[0, b]).reshape(8, 4).sum(1)
            accs[b % 2] = [fma(xb.d[0, b] * d[o, b], f32(int(sums[i])), accs[b % 2][i]) for i in range(8)]
        ref.append(hsum8([accs[0][i] + accs[1][i] for i in range(8)]))
    assert np.array_equal(matmul_iq4_nl(x, MATMULS[T.IQ4_NL].prepare(raw))[0], ref)


# --- tiny models against llama.cpp --------------------------------------------------------------------------------
def _logits(model, ids: list[int], greedy: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Every prompt position's logits (one prefill), then one decode step per llama.cpp greedy token."""
    seq = model.kv.new_sequence()
    try:
        batch = model.kv.prepare([(seq, ids)])
        prefill = model.ops.to_host(model.arch.forward(model.ctx, batch))
        steps = []
        for token in greedy:
            batch = model.kv.prepare([(seq, [token])])
            steps.append(model.ops.to_host(model.arch.forward(model.ctx, batch, rows=batch.last_rows))[0])
        return prefill, np.stack(steps)
    finally:
        model.kv.free(seq)


@pytest.mark.parametrize("ggml_type", [t for t in TYPES if t in MATMULS], ids=lambda t: t.name)
def test_tiny_model_equals_llama_cpp(ggml_type, tmp_path):
    ref = json.loads((OUT / f"{ggml_type.name}.json").read_text())
    path = write_typed_model(tmp_path / "tiny.gguf", ggml_type)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ref["model_sha256"], "the fixture's model changed"
    model = rocmforge.load(path, device="cpu-exact")
    prefill, steps = _logits(model, ref["ids"], ref["greedy"])
    assert np.array_equal(prefill, decode(ref["prefill_logits"], prefill.shape[1]))
    assert np.array_equal(steps, decode(ref["decode_logits"], prefill.shape[1]))
    assert [int(np.argmax(s)) for s in [prefill[-1], *steps[:-1]]] == ref["greedy"]
