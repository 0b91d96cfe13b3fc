"""Each numpy op against a float64 reference written independently (loops, complex numbers, plain formulas)."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from rocmforge.gguf_file import GGUFFile
from rocmforge.ops.attention import attention, attention_mix, attention_scores
from rocmforge.ops.embedding import embedding, quantized_embedding
from rocmforge.ops.encoder_attention import encoder_attention
from rocmforge.ops.geglu import geglu
from rocmforge.ops.gelu import gelu
from rocmforge.ops.layer_norm import layer_norm
from rocmforge.ops.linear import linear
from rocmforge.ops.matmul import matmul, quantized_matmul
from rocmforge.ops.rms_norm import rms_norm
from rocmforge.ops.rope import rope
from rocmforge.ops.softcap import softcap
from rocmforge.ops.softmax import softmax
from rocmforge.ops.swiglu import swiglu

RTOL = 1e-5  # float32 ops on O(1) values: a few ulps of accumulated rounding


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def test_rms_norm_matches_float64(rng):
    x = rng.standard_normal((5, 3, 48)).astype(np.float32) * 3
    w = rng.standard_normal(48).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * w
    got = rms_norm(x, w, 1e-6)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-6)


def _rope_reference(x: np.ndarray, positions: np.ndarray, theta: float, neox: bool, n_rot: int,
                    factors: np.ndarray | None) -> np.ndarray:
    """Rotate each pair as a complex number by position * theta^(-2i/n_rot) / factor_i (float64)."""
    out = x.astype(np.float64).copy()
    half = n_rot // 2
    for t, pos in enumerate(positions):
        for i in range(half):
            freq = theta ** (-2.0 * i / n_rot) / (factors[i] if factors is not None else 1.0)
            a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
            z = (x[t, :, a] + 1j * x[t, :, b].astype(np.float64)) * np.exp(1j * pos * freq)
            out[t, :, a], out[t, :, b] = z.real, z.imag
    return out


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_rot", [16, 8])
def test_rope_matches_complex_rotation(rng, neox, n_rot):
    x = rng.standard_normal((6, 3, 16)).astype(np.float32)
    positions = np.array([0, 1, 2, 17, 300, 4095])
    factors = np.linspace(1.0, 8.0, n_rot // 2).astype(np.float32)
    for f in (None, factors):
        got = rope(x, positions, 10000.0, neox, n_rot, f)
        np.testing.assert_allclose(got, _rope_reference(x, positions, 10000.0, neox, n_rot, f), atol=2e-5)
    assert np.array_equal(rope(x, positions, 10000.0, neox, n_rot)[..., n_rot:], x[..., n_rot:])


def test_softmax_matches_float64_and_handles_masked_rows(rng):
    x = (rng.standard_normal((4, 9)) * 20).astype(np.float32)
    x[1, :4] = -np.inf
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    np.testing.assert_allclose(softmax(x), e / e.sum(-1, keepdims=True), rtol=RTOL, atol=1e-7)
    assert np.all(softmax(np.full((1, 3), -np.inf, np.float32)) == 0)


def _attention_reference(q, k, v, q_positions, scale, window, cap):
    """Per head, per query: explicit loop over visible keys, float64."""
    t, n_heads, _ = q.shape
    group = n_heads // k.shape[1]
    z = np.zeros((t, n_heads, v.shape[-1]))
    for h in range(n_heads):
        for i, p in enumerate(q_positions):
            visible = [j for j in range(k.shape[0]) if j <= p and (window is None or p - j < window)]
            s = np.array([scale * np.dot(q[i, h].astype(np.float64), k[j, h // group]) for j in visible])
            if cap is not None:
                s = cap * np.tanh(s / cap)
            w = np.exp(s - s.max())
            w /= w.sum()
            z[i, h] = sum(wj * v[j, h // group].astype(np.float64) for wj, j in zip(w, visible))
    return z


@pytest.mark.parametrize("window,cap", [(None, None), (3, None), (None, 5.0)])
def test_attention_gqa_causal_window_matches_loops(rng, window, cap):
    n_keys, t, n_heads, n_kv, d = 11, 4, 6, 2, 8
    q = rng.standard_normal((t, n_heads, d)).astype(np.float32)
    k = rng.standard_normal((n_keys, n_kv, d)).astype(np.float32)
    v = rng.standard_normal((n_keys, n_kv, d)).astype(np.float32)
    q_positions = np.arange(n_keys - t, n_keys)  # the last t positions of the sequence (a prefill chunk)
    expected = _attention_reference(q, k, v, q_positions, 0.35, window, cap)
    np.testing.assert_allclose(attention(q, k, v, q_positions, 0.35, window, cap), expected, rtol=1e-4, atol=1e-5)
    scores = attention_scores(q, k, q_positions, 0.35, window, cap)
    assert scores.shape == (n_heads, t, n_keys)
    assert np.isneginf(scores[:, 0, -1]).all()  # causal: the first query cannot see the last key
    pattern = softmax(scores)
    np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(attention_mix(pattern, v), expected, rtol=1e-4, atol=1e-5)


def test_swiglu_and_geglu_match_float64(rng):
    g = (rng.standard_normal(300) * 4).astype(np.float32)
    u = rng.standard_normal(300).astype(np.float32)
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    np.testing.assert_allclose(swiglu(g, u), g64 / (1 + np.exp(-g64)) * u64, rtol=RTOL, atol=1e-6)
    gelu = 0.5 * g64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (g64 + 0.044715 * g64 ** 3)))
    np.testing.assert_allclose(geglu(g, u), gelu * u64, rtol=RTOL, atol=1e-6)


def test_softcap_matches_float64(rng):
    x = (rng.standard_normal(100) * 50).astype(np.float32)
    np.testing.assert_allclose(softcap(x, 30.0), 30.0 * np.tanh(x.astype(np.float64) / 30.0), rtol=RTOL, atol=1e-5)


def _llama_cpp_activations(x: np.ndarray, ggml_type: T) -> np.ndarray:
    """How llama.cpp rounds activations next to each weight type, built from gguf's reference quantizers
    (Q8_0 blocks of 32, BF16) or written out in float64 (Q8_K: blocks of 256, scale max|x|/127 kept in f32)."""
    if ggml_type in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
        return dequantize(quantize(x, T.Q8_0), T.Q8_0)
    if ggml_type in (T.Q4_K, T.Q6_K):
        blocks = x.astype(np.float64).reshape(x.shape[0], -1, 256)
        scale = np.float32(np.abs(blocks).max(-1, keepdims=True) / 127)
        return (np.round(blocks / scale) * scale).reshape(x.shape)
    if ggml_type == T.BF16:
        return dequantize(quantize(x, T.BF16), T.BF16)
    return x.astype(np.float16) if ggml_type == T.F16 else x


def _q8_1_min_term_error(x: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Q4_1/Q5_1 x Q8_1 in llama.cpp: per block d_w*d_a*sum(q_w*q_a) + m_w*s_a with s_a = fp16(d_a*sum(q_a)),
    d_a the f32 scale max|x|/127; the dequantized product has m_w*fp16(d_a)*sum(q_a) instead. Returns the
    difference ``[rows of x, rows of w]`` in float64."""
    blocks = x.reshape(x.shape[0], -1, 32).astype(np.float64)
    d32 = (np.abs(blocks).max(-1) / 127).astype(np.float32)
    sum_q = dequantize(quantize(x, T.Q8_0), T.Q8_0).reshape(blocks.shape).sum(-1) / d32.astype(np.float16)
    sum_q = np.round(sum_q.astype(np.float64))
    s = (d32 * sum_q.astype(np.float32)).astype(np.float16).astype(np.float64)
    block_bytes = 20 if raw.shape[1] * 32 // x.shape[1] == 20 else 24  # Q4_1 or Q5_1; both start fp16 d, fp16 m
    m = raw.reshape(raw.shape[0], -1, block_bytes)[..., 2:4]
    m = np.ascontiguousarray(m).view(np.float16)[..., 0].astype(np.float64)
    return (s - d32.astype(np.float16).astype(np.float64) * sum_q) @ m.T


@pytest.mark.parametrize("ggml_type", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.F16, T.BF16, T.F32])
def test_quantized_matmul_matches_dequantized_float64(rng, ggml_type):
    w = rng.standard_normal((24, 96)).astype(np.float32)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    raw = quantize(w, ggml_type)
    x_seen = _llama_cpp_activations(x, ggml_type).astype(np.float64)
    expected = x_seen @ dequantize(raw, ggml_type).astype(np.float64).T
    if ggml_type in (T.Q4_1, T.Q5_1):
        expected += _q8_1_min_term_error(x, raw)
    got = quantized_matmul(x, raw, ggml_type)
    assert got.shape == (3, 24) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # and the quantization is what it claims to be: close to the float32 product
    error = np.abs(got - x @ w.T).max() / np.abs(x @ w.T).max()
    assert error < {T.Q4_0: 0.2, T.Q4_1: 0.2, T.Q5_0: 0.1, T.Q5_1: 0.1}.get(ggml_type, 0.02)


@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q6_K])
def test_kquant_matmul_on_real_gemma_tensors(gemma3_path, rng, ggml_type):
    gguf = GGUFFile(gemma3_path)
    ref = next(r for r in gguf.tensors.values() if r.ggml_type == ggml_type and len(r.shape) == 2)
    raw = np.asarray(ref.raw)[:32]  # 32 output rows of the real tensor
    x = rng.standard_normal((2, ref.shape[1])).astype(np.float32)
    x_seen = _llama_cpp_activations(x, ggml_type)
    expected = x_seen @ dequantize(raw, ggml_type).astype(np.float64).T
    np.testing.assert_allclose(quantized_matmul(x, raw, ggml_type), expected, rtol=1e-4, atol=1e-4)


def test_matmul_is_x_times_weight_transposed(rng):
    x = rng.standard_normal((4, 10)).astype(np.float32)
    w = rng.standard_normal((7, 10)).astype(np.float32)
    np.testing.assert_allclose(matmul(x, w), x.astype(np.float64) @ w.astype(np.float64).T, rtol=1e-5, atol=1e-5)


def test_embedding_rows_quantized_and_dense(rng):
    table = rng.standard_normal((50, 64)).astype(np.float32)
    tokens = np.array([3, 0, 49, 3])
    assert np.array_equal(embedding(table, tokens), table[tokens])
    raw = quantize(table, T.Q8_0)
    np.testing.assert_array_equal(quantized_embedding(raw, T.Q8_0, tokens), dequantize(raw, T.Q8_0)[tokens])


def test_layer_norm_matches_float64(rng):
    x = (rng.standard_normal((37, 384)) * 3 + 5).astype(np.float32)  # an offset mean: the two-pass variance matters
    w, b = rng.standard_normal(384).astype(np.float32), rng.standard_normal(384).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-12) * w + b
    got = layer_norm(x, w, b, 1e-12)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)


def test_layer_norm_of_a_residual_sum_matches_float64(rng):
    x, residual = ((rng.standard_normal((37, 384)) * 3 + 5).astype(np.float32) for _ in range(2))
    w, b = rng.standard_normal(384).astype(np.float32), rng.standard_normal(384).astype(np.float32)
    total = x.astype(np.float64) + residual
    ref = (total - total.mean(-1, keepdims=True)) / np.sqrt(total.var(-1, keepdims=True) + 1e-12) * w + b
    np.testing.assert_allclose(layer_norm(x, w, b, 1e-12, residual=residual), ref, rtol=2e-5, atol=2e-5)


def test_gelu_is_exact_erf_gelu(rng):
    x = (rng.standard_normal(10_000) * 4).astype(np.float32)
    ref = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(gelu(x), ref, rtol=1e-6, atol=1e-7)
    tanh_form = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    assert np.abs(gelu(x) - tanh_form).max() > 1e-4  # not the tanh approximation


def test_linear_matches_float64(rng):
    weight = rng.standard_normal((96, 48)).astype(np.float32)
    bias = rng.standard_normal(96).astype(np.float32)
    for rows in (1, 255, 1100):  # one block; two, the last shorter; four or more (MAX_BLOCK_ROWS = 512)
        x = rng.standard_normal((rows, 48)).astype(np.float32)
        got = linear(x, weight, bias)
        assert got.dtype == np.float32 and got.shape == (rows, 96)
        ref = x.astype(np.float64) @ weight.T + bias
        np.testing.assert_allclose(got, ref, rtol=RTOL, atol=1e-5)
        gelu_ref = 0.5 * ref * (1 + np.vectorize(math.erf)(ref / math.sqrt(2)))
        np.testing.assert_allclose(linear(x, weight, bias, gelu=True), gelu_ref, rtol=RTOL, atol=1e-5)


def test_linear_with_a_residual_norm_is_linear_then_layer_norm(rng):
    """The norm fused into the linear's blocks (the encoder's output projections) gives layer_norm's bits."""
    weight, bias = rng.standard_normal((384, 96)).astype(np.float32), rng.standard_normal(384).astype(np.float32)
    norm_weight, norm_bias = rng.standard_normal(384).astype(np.float32), rng.standard_normal(384).astype(np.float32)
    for rows in (1, 600):
        x, residual = rng.standard_normal((rows, 96)).astype(np.float32), rng.standard_normal((rows, 384)).astype(np.float32)
        got = linear(x, weight, bias, norm=(residual, norm_weight, norm_bias, 1e-12))
        want = layer_norm(linear(x, weight, bias), norm_weight, norm_bias, 1e-12, residual=residual)
        np.testing.assert_array_equal(got, want)
        total = x.astype(np.float64) @ weight.T + bias + residual  # and the textbook formula in float64
        ref = (total - total.mean(1, keepdims=True)) / np.sqrt(total.var(1, keepdims=True) + 1e-12)
        np.testing.assert_allclose(got, ref * norm_weight + norm_bias, rtol=1e-4, atol=1e-4)


def test_exp_f32_is_within_an_ulp_of_exp():
    import numba

    from rocmforge.ops.cpu_kernels import exp_f32

    @numba.njit
    def exp_all(x, out):
        for i in range(x.size):
            out[i] = exp_f32(x[i])

    x = np.linspace(-87, 88, 200_001).astype(np.float32)
    out = np.empty_like(x)
    exp_all(x, out)
    np.testing.assert_allclose(out, np.exp(x.astype(np.float64)), rtol=1.2e-7)  # float32's ulp is 6e-8 to 1.2e-7


def test_encoder_attention_matches_padded_masked_attention(rng):
    lengths, heads, d_head = [5, 1, 17, 9], 3, 8
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    q, k, v = (rng.standard_normal((offsets[-1], heads * d_head)).astype(np.float32) for _ in range(3))
    got = encoder_attention(q, k, v, offsets, heads, 0.25)
    for s, t in enumerate(lengths):  # each text alone, in float64, by the textbook formula
        rows = slice(offsets[s], offsets[s + 1])
        for h in range(heads):
            cols = slice(h * d_head, (h + 1) * d_head)
            scores = q[rows, cols].astype(np.float64) @ k[rows, cols].T * 0.25
            p = np.exp(scores - scores.max(1, keepdims=True))
            ref = (p / p.sum(1, keepdims=True)) @ v[rows, cols]
            np.testing.assert_allclose(got[rows, cols], ref, rtol=1e-5, atol=1e-6)


def test_encoder_attention_of_long_and_peaked_sequences(rng):
    """Sequences up to 256 tokens (a BERT window) and scores far apart, against the float64 textbook formula."""
    lengths, heads, d_head = [256, 3, 130], 2, 32
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    q, k, v = ((rng.standard_normal((offsets[-1], heads * d_head)) * 3).astype(np.float32) for _ in range(3))
    got = encoder_attention(q, k, v, offsets, heads, 0.5)
    for s in range(len(lengths)):
        rows = slice(offsets[s], offsets[s + 1])
        for h in range(heads):
            cols = slice(h * d_head, (h + 1) * d_head)
            scores = q[rows, cols].astype(np.float64) @ k[rows, cols].T * 0.5
            p = np.exp(scores - scores.max(1, keepdims=True))
            np.testing.assert_allclose(got[rows, cols], (p / p.sum(1, keepdims=True)) @ v[rows, cols],
                                       rtol=1e-4, atol=1e-4)  # scores up to ~30: float32 rounding



def test_encoder_attention_reads_column_blocks_of_one_projection_in_place(rng):
    """q, k and v as column blocks of one q|k|v product (the CPU encoder's) give the bits of contiguous copies."""
    offsets = np.array([0, 7, 200, 201])
    qkv = rng.standard_normal((201, 3 * 96)).astype(np.float32)
    q, k, v = qkv[:, :96], qkv[:, 96:192], qkv[:, 192:]
    got = encoder_attention(q, k, v, offsets, 3, 0.2)
    np.testing.assert_array_equal(got, encoder_attention(*(np.ascontiguousarray(a) for a in (q, k, v)), offsets, 3, 0.2))
    assert got.flags.c_contiguous and got.shape == (201, 96)


def test_encoder_ops_from_four_threads_run_blas_on_one_thread_and_equal_one_thread(rng, monkeypatch):
    """``linear`` calls SciPy's BLAS from numba's threads, so it must be on one thread inside each call, whatever
    else holds threadpoolctl: here a live thread that set a limit first (threadpoolctl then ignores every other
    thread's limits) while four threads embed at once (the store may). ``encoder_attention`` (no BLAS) runs its
    parallel loop from the same four threads. Each result is the one it gets alone, to the bit, and the BLAS
    thread count is put back afterwards."""
    from threadpoolctl import threadpool_limits

    from rocmforge.ops import cpu_kernels, linear as linear_module

    weight, bias = rng.standard_normal((384, 384)).astype(np.float32), rng.standard_normal(384).astype(np.float32)
    offsets = np.array([0, 100, 190, 300])
    inputs = [rng.standard_normal((300, 384)).astype(np.float32) for _ in range(4)]
    alone = [(linear(x, weight, bias), encoder_attention(x, x, x, offsets, 12, 0.125)) for x in inputs]
    inside: list[int] = []

    def counting(kernel):
        def run(*args):
            inside.extend(cpu_kernels.scipy_blas().counts())
            kernel(*args)
        return run

    monkeypatch.setattr(linear_module, "_linear_blocks", counting(linear_module._linear_blocks))
    got: dict[int, list] = {i: [] for i in range(4)}

    def work(i: int) -> None:
        for _ in range(10):
            got[i].append((linear(inputs[i], weight, bias), encoder_attention(*[inputs[i]] * 3, offsets, 12, 0.125)))

    holding, done = threading.Event(), threading.Event()

    def hold_threadpoolctl() -> None:
        with threadpool_limits(2, user_api="blas"):
            holding.set()
            done.wait(60)

    holder = threading.Thread(target=hold_threadpoolctl)
    holder.start()
    try:
        assert holding.wait(10)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = cpu_kernels.scipy_blas().counts()
    finally:
        done.set()
        holder.join()
    assert set(inside) == {1} and set(after) == {2}, (sorted(set(inside)), after)
    for i in range(4):
        for linear_out, attention_out in got[i]:
            np.testing.assert_array_equal(linear_out, alone[i][0])
            np.testing.assert_array_equal(attention_out, alone[i][1])


def test_cpu_backend_rope_from_two_threads_uses_each_batchs_positions(rng, monkeypatch):
    # the server runs two groups of sequences as forwards in parallel threads on one backend. Its per-batch cache
    # of cos/sin tables once handed one thread the other's tables (a broadcast error in CI): force that
    # interleaving — thread A computes its tables while thread B runs a layer — then B runs its next layer
    import rocmforge.backends.cpu as cpu

    backend = cpu.CpuBackend()
    (x_a, pos_a), (x_b, pos_b) = [(rng.standard_normal((n, 3, 64)).astype(np.float32),
                                   np.arange(n, dtype=np.int64) + 7 * n) for n in (29, 34)]
    a_computing, b_ran_a_layer, a_done = threading.Event(), threading.Event(), threading.Event()
    compute = cpu.rope_tables

    def slow_for_a(positions, *args):
        if len(positions) == len(pos_a):
            a_computing.set()
            assert b_ran_a_layer.wait(10)
        return compute(positions, *args)

    monkeypatch.setattr(cpu, "rope_tables", slow_for_a)
    got_a: list[np.ndarray] = []
    thread_a = threading.Thread(target=lambda: (got_a.append(backend.rope(x_a, pos_a, 10000.0, False, 64)),
                                                a_done.set()))
    thread_a.start()
    assert a_computing.wait(10)
    first_b = backend.rope(x_b, pos_b, 10000.0, False, 64)
    b_ran_a_layer.set()
    assert a_done.wait(10)
    second_b = backend.rope(x_b, pos_b, 10000.0, False, 64)
    thread_a.join()
    np.testing.assert_allclose(got_a[0], rope(x_a, pos_a, 10000.0, False, 64), rtol=1e-6, atol=1e-6)
    for got in (first_b, second_b):
        np.testing.assert_allclose(got, rope(x_b, pos_b, 10000.0, False, 64), rtol=1e-6, atol=1e-6)
