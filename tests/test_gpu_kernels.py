"""Every GPU kernel against its numpy twin (``rocmforge.ops``) on fresh random inputs of several shapes.

Tolerances are relative (‖gpu − ref‖ / ‖ref‖) and stated per test; they are float32 expectations: sums of up
to a few thousand float32 products land near 1e-6, so 2e-5 leaves room without hiding a wrong index (which
gives errors of order 1). Quantized matmuls are compared with gguf's own dequantization in float64.
Skipped, with the reason, on machines without a GPU (CI); run on the device by benchmarks/gpu_device_run.sh.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

from rocmforge.backends.gpu_records import activation_rounding
from rocmforge.backends.runtime import i32, i64, ptr
from rocmforge.gguf_file import TensorRef
from rocmforge.kv_cache import KVCache
from rocmforge.ops.add import add
from rocmforge.ops.attention import attention
from rocmforge.ops.encoder_attention import encoder_attention
from rocmforge.ops.geglu import geglu
from rocmforge.ops.gelu import gelu
from rocmforge.ops.layer_norm import layer_norm
from rocmforge.ops.linear import linear
from rocmforge.ops.matmul import round_activations
from rocmforge.ops.rms_norm import rms_norm
from rocmforge.ops.rope import rope
from rocmforge.ops.softcap import softcap
from rocmforge.ops.softmax import softmax
from rocmforge.ops.swiglu import swiglu
from tests.gpu_runtimes import gpu_runtime

pytestmark = pytest.mark.gpu
rng = np.random.default_rng()
_names = itertools.count()


@pytest.fixture(scope="module")
def gpu():
    from rocmforge.backends.gpu import GpuBackend
    return GpuBackend(gpu_runtime())


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.all(np.isfinite(got)), "non-finite values in the GPU result"
    return float(np.linalg.norm(got.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))


def f32(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def random_weight(ggml_type: Q, rows: int, cols: int) -> TensorRef:
    """A random tensor in ``ggml_type``: quantized from floats where gguf can, random blocks for K-quants."""
    if ggml_type in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        block, size = GGML_QUANT_SIZES[ggml_type]
        raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        scales = rng.uniform(0.001, 0.02, (rows, cols // block, 2)).astype(np.float16).view(np.uint8)
        if ggml_type == Q.Q6_K:
            raw[..., 208:210] = scales[..., :2]  # d is last; the int8 scales may be anything
        else:
            raw[..., 0:4] = scales  # d, dmin first
        raw = raw.reshape(rows, -1)
    else:
        raw = quantize(f32(rows, cols), ggml_type)
    return TensorRef(f"w_{ggml_type.name}_{next(_names)}", ggml_type, (rows, cols), raw, raw.nbytes)


MATMUL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("ggml_type", MATMUL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m,n,k", [(1, 576, 512), (1, 1000, 1536), (3, 200, 256), (77, 130, 768), (130, 64, 2048),
                                   (600, 2048, 256), (1, 8192, 256)])
def test_matmul_matches_dequantized_float64(gpu, ggml_type, m, n, k):
    """The twin's semantics (llama.cpp's): activations rounded for the weight type, times the decoded blocks."""
    tensor = random_weight(ggml_type, n, k)
    w = dequantize(tensor.raw, ggml_type).reshape(n, k).astype(np.float64)
    x = f32(m, k)
    got = gpu.to_host(gpu.matmul(gpu.from_host(x), gpu.load_weight(tensor)))
    assert rel_err(got, round_activations(x, ggml_type).astype(np.float64) @ w.T) < 2e-5


MMA_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("ggml_type", MMA_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m,n,k", [(33, 100, 288), (512, 576, 512), (70, 1030, 1536)])
def test_many_rows_run_on_the_matrix_units(gpu, ggml_type, m, n, k):
    """Prefill-sized matmuls of the integer formats are int8 tile products (kernels/matmul_mma.hip) with the twin's
    result: a half 64-deep K step (K = 288), 32- and 64-row tiles, ragged edges, the residual add fused behind."""
    if ggml_type in (Q.Q4_K, Q.Q5_K, Q.Q6_K) and k % 256:
        k = 256 * (k // 256)
    tensor = random_weight(ggml_type, n, k)
    w = dequantize(tensor.raw, ggml_type).reshape(n, k).astype(np.float64)
    x, residual = f32(m, k), f32(m, n)
    weight, dx, dr = gpu.load_weight(tensor), gpu.from_host(x), gpu.from_host(residual)

    def run():
        y = gpu.matmul(dx, weight)
        return y, gpu.add(y, dr)

    (y, total), timed = gpu.profile(run)
    assert {kernel for _, kernel, _ in timed} >= {"quantize_q8"}
    assert any(kernel.startswith("mma_") and kernel.endswith(weight.kernel_suffix) for _, kernel, _ in timed)
    ref = round_activations(x, ggml_type).astype(np.float64) @ w.T
    assert rel_err(gpu.to_host(y), ref) < 2e-5
    assert rel_err(gpu.to_host(total), ref + residual) < 2e-5


def test_many_row_qkv_in_one_matrix_unit_launch(gpu):
    """Three matmuls of one input (q, k, v of a prefill) share one quantization and one tile launch."""
    x = f32(100, 576)
    tensors = [random_weight(Q.Q4_1, rows, 576) for rows in (576, 192, 100)]
    dx, weights = gpu.from_host(x), [gpu.load_weight(t) for t in tensors]
    outs, timed = gpu.profile(lambda: [gpu.matmul(dx, w) for w in weights])
    # 32- or 64-token tiles, by how many multiprocessors the device has
    assert [kernel.replace("mma_m32_", "mma_") for _, kernel, _ in timed] == ["quantize_q8", "mma_q4_1"]
    rounded = round_activations(x, Q.Q4_1).astype(np.float64)
    for out, t in zip(outs, tensors):
        ref = rounded @ dequantize(t.raw, Q.Q4_1).reshape(t.shape).astype(np.float64).T
        assert rel_err(gpu.to_host(out), ref) < 2e-5, t.shape


@pytest.mark.parametrize("ggml_type", [Q.Q4_1, Q.Q4_K], ids=lambda t: t.name)
def test_many_row_norm_folds_into_the_quantization(gpu, ggml_type):
    """A prefill's RMSNorm in front of its matmuls is done by the activations' quantization launch; the normalized
    rows are still written, with rms_norm's own arithmetic."""
    x, w = f32(77, 768), rng.uniform(0.5, 1.5, 768).astype(np.float32)
    tensor = random_weight(ggml_type, 300, 768)
    dx, dw, weight = gpu.from_host(x), gpu.from_host(w), gpu.load_weight(tensor)
    (normed, y), timed = gpu.profile(lambda: (lambda n: (n, gpu.matmul(n, weight)))(gpu.rms_norm(dx, dw, 1e-5)))
    assert [kernel.replace("mma_m32_", "mma_") for _, kernel, _ in timed] == ["quantize_q8_norm",
                                                                           f"mma_{weight.kernel_suffix}"]
    host_normed = gpu.to_host(normed)
    assert rel_err(host_normed, rms_norm(x, w, 1e-5)) < 1e-6
    ref = round_activations(host_normed, ggml_type).astype(np.float64) @ dequantize(tensor.raw, ggml_type).reshape(
        tensor.shape).astype(np.float64).T
    assert rel_err(gpu.to_host(y), ref) < 2e-5


@pytest.mark.parametrize("ggml_type", [Q.Q8_0, Q.Q4_K], ids=lambda t: t.name)
def test_int8_activations_are_the_rounded_activations(gpu, ggml_type):
    """quantize_q8's integers times its block scales are round_activations' values bit for bit, and its block sums
    are the sums of those values (what the weights' offsets m multiply)."""
    m, k = 37, 1024
    x = f32(m, k) * rng.uniform(0.01, 10.0, (m, 1)).astype(np.float32)
    dx = gpu.from_host(x)
    xq, xd, xs = gpu._empty((m, k), np.int8), gpu._empty((m, k // 32)), gpu._empty((m, k // 32))
    gpu._launch("matmul_mma", "quantize_q8", gpu._elementwise_grid(x.size // 8), 256,
                [ptr(dx.address), ptr(xq.address), ptr(xd.address), ptr(xs.address), i64(x.size),
                 i32(activation_rounding(ggml_type))])
    values = gpu.to_host(xq).astype(np.float32).reshape(m, k // 32, 32) * gpu.to_host(xd)[..., None]
    assert np.array_equal(values.reshape(m, k), round_activations(x, ggml_type))
    # scale * sum(q) against the sum of the values: equal up to float32 rounding of terms that may cancel
    blocks = values.reshape(m, k // 32, 32)
    assert np.all(np.abs(gpu.to_host(xs) - blocks.sum(-1)) <= 4e-6 * np.abs(blocks).sum(-1))


@pytest.mark.parametrize("ggml_type", MATMUL_TYPES, ids=lambda t: t.name)
def test_embedding_lookup_decodes_rows(gpu, ggml_type):
    tensor = random_weight(ggml_type, 300, 512)
    tokens = rng.integers(0, 300, 17)
    got = gpu.to_host(gpu.embedding(gpu.load_embedding(tensor, tied=False), tokens))
    ref = dequantize(tensor.raw, ggml_type).reshape(300, 512)[tokens]
    assert rel_err(got, ref) < 1e-6


@pytest.mark.parametrize("shape", [(1, 576), (7, 2048), (5, 3, 64), (2, 8, 256)])
def test_rms_norm(gpu, shape):
    x, w = f32(*shape), f32(shape[-1])
    got = gpu.to_host(gpu.rms_norm(gpu.from_host(x), gpu.from_host(w), 1e-5))
    assert rel_err(got, rms_norm(x, w, 1e-5)) < 2e-6


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n,heads,d,n_rot,theta", [(1, 9, 64, 64, 10000.0), (37, 4, 256, 256, 1e6), (5, 2, 128, 64, 500000.0)])
def test_rope(gpu, neox, n, heads, d, n_rot, theta):
    x = f32(n, heads, d)
    positions = np.sort(rng.integers(0, 5000, n))
    factors = rng.uniform(1.0, 8.0, n_rot // 2).astype(np.float32)
    for freq in (None, factors):
        got = gpu.to_host(gpu.rope(gpu.from_host(x), positions, theta, neox, n_rot,
                                   gpu.from_host(freq) if freq is not None else None, 1.0))
        assert rel_err(got, rope(x, positions, theta, neox, n_rot, freq)) < 1e-5


def _filled_cache(gpu, n_kv: int, d: int, chunks: list[int]):
    """A GPU cache and its host twin holding one sequence written chunk by chunk; yields each chunk's batch."""
    cache = KVCache(1, n_kv, d, d, n_ctx=sum(chunks) + 16, block_size=16, ops=gpu)
    seq = cache.new_sequence()
    keys, values = [], []
    for size in chunks:
        batch = cache.prepare([(seq, list(rng.integers(0, 100, size)))])
        k, v = f32(size, n_kv, d), f32(size, n_kv, d)
        gpu.kv_write(cache, 0, batch, gpu.from_host(k), gpu.from_host(v))
        keys.append(k)
        values.append(v)
        yield cache, batch, np.concatenate(keys), np.concatenate(values)


@pytest.mark.parametrize("heads,n_kv,d", [(9, 3, 64), (4, 1, 256), (8, 8, 128), (6, 2, 96)])
@pytest.mark.parametrize("chunks,window,cap", [([300], None, None), ([70, 1, 1, 45, 1], None, None),
                                               ([200, 1], 16, None), ([33, 1], None, 30.0), ([1000, 1], None, None)])
def test_attention_prefill_and_decode(gpu, heads, n_kv, d, chunks, window, cap):
    """Prefill chunks (flash attention) and single tokens (split-K decode) over a paged cache."""
    for cache, batch, keys, values in _filled_cache(gpu, n_kv, d, chunks):
        q = f32(batch.n_tokens, heads, d)
        scale = d ** -0.5
        got = gpu.to_host(gpu.attention(gpu.from_host(q), cache, 0, batch, scale, window, cap))
        ref = attention(q, keys, values, batch.positions, scale, window, cap)
        assert rel_err(got, ref) < 1e-5, f"{batch.n_tokens} queries at {batch.positions[0]}"


@pytest.mark.parametrize("shape", [(1, 49152), (9, 37), (4, 3, 300)])
def test_softmax(gpu, shape):
    x = f32(*shape) * 4
    assert rel_err(gpu.to_host(gpu.softmax(gpu.from_host(x))), softmax(x)) < 2e-6


@pytest.mark.parametrize("n", [1, 1536, 100_003])
def test_elementwise_ops(gpu, n):
    a, b = f32(3, n), f32(3, n)
    da, db = gpu.from_host(a), gpu.from_host(b)
    assert rel_err(gpu.to_host(gpu.swiglu(da, db)), swiglu(a, b)) < 1e-6
    assert rel_err(gpu.to_host(gpu.geglu(da, db)), geglu(a, b)) < 1e-6
    assert rel_err(gpu.to_host(gpu.add(da, db)), add(a, b)) < 1e-7
    bias = f32(n)
    assert rel_err(gpu.to_host(gpu.add(da, gpu.from_host(bias))), add(a, bias)) < 1e-7
    assert rel_err(gpu.to_host(gpu.scale(da, 3.5)), a * np.float32(3.5)) < 1e-7
    assert rel_err(gpu.to_host(gpu.softcap(gpu.from_host(a * 40), 30.0)), softcap(a * 40, 30.0)) < 1e-6


def test_take_and_concat_rows(gpu):
    x = f32(10, 3, 4)
    dx = gpu.from_host(x)
    rows = np.array([7, 2, 2, 9])
    assert np.array_equal(gpu.to_host(gpu.take_rows(dx, rows)), x[rows])
    assert np.array_equal(gpu.to_host(gpu.take_rows(dx, slice(3, 6))), x[3:6])
    parts = [gpu.take_rows(dx, slice(0, 2)), gpu.take_rows(dx, rows)]
    assert np.array_equal(gpu.to_host(gpu.concat_rows(parts)), np.concatenate([x[0:2], x[rows]]))


@pytest.mark.parametrize("shape", [(1, 49152), (3, 1000), (2, 7)])
def test_argmax_first_of_ties(gpu, shape):
    x = f32(*shape)
    x[:, shape[1] // 2] = x[:, -1] = x.max() + 1  # a tie: the first index must win, as in numpy
    assert np.array_equal(gpu.to_host(gpu.argmax(gpu.from_host(x))), np.argmax(x, axis=-1))


def sample_reference(logits: np.ndarray, top_k: int, top_p: float, temperature: float, u: float) -> int:
    order = np.lexsort((np.arange(len(logits)), -logits))[: min(top_k or 256, 256)]
    p = np.exp((logits[order].astype(np.float64) - logits[order[0]]) / temperature)
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
    kept = p[:keep] / p[:keep].sum()
    return int(order[min(int(np.searchsorted(np.cumsum(kept), u, side="right")), keep - 1)])


@pytest.mark.parametrize("top_k,top_p,temperature", [(40, 0.9, 0.8), (1, 1.0, 1.0), (0, 0.5, 1.2), (256, 1.0, 0.7)])
def test_sampling_on_device_matches_reference(gpu, top_k, top_p, temperature):
    logits = f32(49152) * 3
    dl = gpu.from_host(logits)
    for u in rng.uniform(0, 1, 10):
        assert gpu.sample(dl, top_k, top_p, temperature, float(u)) == sample_reference(logits, top_k, top_p, temperature, u)


def test_warp_size_read_from_device(gpu):
    assert gpu.rt.warp_size in (32, 64)
    # the compiled kernels see the same number
    assert f"-DRF_WARP={gpu.rt.warp_size}" in gpu.rt.compile_options()


def test_decode_graph_replays_with_new_positions_and_slots(gpu):
    """A captured step (rope -> kv_write -> decode attention) replayed at later positions equals numpy."""
    heads, n_kv, d = 4, 2, 64
    cache = KVCache(1, n_kv, d, d, n_ctx=96, block_size=16, ops=gpu)
    seq = cache.new_sequence()
    first = cache.prepare([(seq, list(range(20)))])
    keys, values = f32(20, n_kv, d), f32(20, n_kv, d)
    gpu.kv_write(cache, 0, first, gpu.from_host(keys), gpu.from_host(values))
    dq, dk, dv = gpu.from_host(f32(1, heads, d)), gpu.from_host(f32(1, n_kv, d)), gpu.from_host(f32(1, n_kv, d))
    for _ in range(5):
        batch = cache.prepare([(seq, [7])])
        q, k, v = f32(1, heads, d), f32(1, n_kv, d), f32(1, n_kv, d)
        for dev, host in ((dq, q), (dk, k), (dv, v)):
            gpu.rt.copy_to_device(dev.address, host)

        def step(batch=batch):
            gpu.kv_write(cache, 0, batch, gpu.rope(dk, batch.positions, 10000.0, False, d), dv)
            return gpu.attention(gpu.rope(dq, batch.positions, 10000.0, False, d), cache, 0, batch, 0.125, None, None)

        got = gpu.to_host(gpu.graph_step(batch, step))
        keys = np.concatenate([keys, rope(k, batch.positions, 10000.0, False)])
        values = np.concatenate([values, v])
        ref = attention(rope(q, batch.positions, 10000.0, False), keys, values, batch.positions, 0.125)
        assert rel_err(got, ref) < 1e-5, f"position {batch.positions[0]}"
    assert len(gpu._graphs) == 1  # captured once, replayed after


@pytest.mark.parametrize("ggml_type", [Q.Q4_1, Q.Q4_K, Q.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("act", ["swiglu", "geglu"])
def test_decode_fusions_equal_op_by_op(gpu, ggml_type, act):
    """One decode layer's op sequence: norm folded into q/k/v (one launch), gate/up/act in one launch,
    residual adds folded into their matvecs; every intermediate is still written and equals numpy.
    (A rounding tie in the 8-bit activation blocks could flip one code between the fused norm and numpy's;
    comparing each matmul against the GPU's own rounded input keeps the check exact.)"""
    d, ff = 512, 1536
    x, res, norm_w = f32(1, d), f32(1, d), f32(d)
    wq, wk, wv, wg, wu = (random_weight(ggml_type, n, d) for n in (d, 256, 256, ff, ff))
    wd = random_weight(ggml_type, d, ff)
    dense = {t.name: dequantize(t.raw, ggml_type).reshape(t.shape).astype(np.float64) for t in (wq, wk, wv, wg, wu, wd)}
    dev = {t.name: gpu.load_weight(t) for t in (wq, wk, wv, wg, wu, wd)}
    outs = {}

    def layer():
        n = gpu.rms_norm(gpu.from_host(x), gpu.from_host(norm_w), 1e-5)
        q, k, v = (gpu.matmul(n, dev[w.name]) for w in (wq, wk, wv))
        attn_sum = gpu.add(gpu.from_host(res), gpu.matmul(q, dev[wq.name]))
        n2 = gpu.rms_norm(attn_sum, gpu.from_host(norm_w), 1e-5)
        g, u = gpu.matmul(n2, dev[wg.name]), gpu.matmul(n2, dev[wu.name])
        a = getattr(gpu, act)(g, u)
        y = gpu.matmul(a, dev[wd.name])
        outs.update(n=n, q=q, k=k, v=v, attn_sum=attn_sum, n2=n2, g=g, u=u, a=a, y=y, out=gpu.add(attn_sum, y))

    kernels = [kernel for _, kernel, _ in gpu.profile(layer)[1]]
    suffix = ggml_type.name.lower()
    assert kernels == [f"matvec_{suffix}", f"matvec_{suffix}", f"matvec_glu_{suffix}", f"matvec_{suffix}"]
    host = {name: gpu.to_host(a) for name, a in outs.items()}
    # each matmul's input is the GPU's own (checked) previous output, rounded as llama.cpp does
    rounded = {name: round_activations(host[name], ggml_type).astype(np.float64) for name in ("n", "q", "n2", "a")}
    ref = {"n": rms_norm(x, norm_w, 1e-5)}
    ref.update({name: rounded["n"] @ dense[w.name].T for name, w in (("q", wq), ("k", wk), ("v", wv))})
    ref["attn_sum"] = res + rounded["q"] @ dense[wq.name].T
    ref["n2"] = rms_norm(host["attn_sum"], norm_w, 1e-5)
    ref["g"], ref["u"] = rounded["n2"] @ dense[wg.name].T, rounded["n2"] @ dense[wu.name].T
    ref["a"] = (swiglu if act == "swiglu" else geglu)(host["g"], host["u"])
    ref["y"] = rounded["a"] @ dense[wd.name].T
    ref["out"] = host["attn_sum"] + host["y"]
    for name, value in ref.items():
        assert rel_err(host[name], np.asarray(value, np.float64)) < 2e-5, name


def test_decode_qkv_rope_and_cache_store_in_one_launch(gpu):
    """q/k/v of one token, normal rope of q and k and the cache store, all done by one matvec launch."""
    heads, n_kv, d, hidden = 9, 3, 64, 576
    cache = KVCache(1, n_kv, d, d, n_ctx=64, block_size=16, ops=gpu)
    seq = cache.new_sequence()
    cache.prepare([(seq, list(range(37)))])
    batch = cache.prepare([(seq, [5])])
    x = f32(1, hidden)
    weights = [random_weight(Q.Q8_0, rows, hidden) for rows in (heads * d, n_kv * d, n_kv * d)]
    dev = [gpu.load_weight(w) for w in weights]
    outs = {}

    def step():
        dx = gpu.from_host(x)
        q, k, v = (gpu.matmul(dx, w) for w in dev)
        q, k, v = q.reshape(1, heads, d), k.reshape(1, n_kv, d), v.reshape(1, n_kv, d)
        q_rot = gpu.rope(q, batch.positions, 10000.0, False, d)
        k_rot = gpu.rope(k, batch.positions, 10000.0, False, d)
        gpu.kv_write(cache, 0, batch, k_rot, v)
        outs.update(q=q, k=k, v=v, q_rot=q_rot, k_rot=k_rot)

    kernels = [kernel for _, kernel, _ in gpu.profile(step)[1]]
    assert kernels == ["matvec_q8_0"]
    host = {name: gpu.to_host(a) for name, a in outs.items()}
    rounded = round_activations(x, Q.Q8_0).astype(np.float64)
    for name, w in zip("qkv", weights):
        ref = rounded @ dequantize(w.raw, Q.Q8_0).reshape(w.shape).astype(np.float64).T
        assert rel_err(host[name].reshape(1, -1), ref) < 2e-5, name
    for name in ("q", "k"):
        assert rel_err(host[f"{name}_rot"], rope(host[name], batch.positions, 10000.0, False)) < 1e-5, name
    slot = batch.slots[0]
    assert np.array_equal(gpu.to_host(cache.k[0])[slot], host["k_rot"][0])
    assert np.array_equal(gpu.to_host(cache.v[0])[slot], host["v"][0])


@pytest.mark.parametrize("rows,d", [(1, 384), (300, 384), (7, 1000)])
def test_layer_norm(gpu, rows, d):
    x, w, b = f32(rows, d) * 3 + 5, f32(d), f32(d)
    got = gpu.to_host(gpu.layer_norm(gpu.from_host(x), gpu.from_host(w), gpu.from_host(b), 1e-12))
    assert rel_err(got, layer_norm(x, w, b, 1e-12)) < 2e-6


@pytest.mark.parametrize("n", [1, 1536, 100_003])
def test_gelu(gpu, n):
    x = f32(3, n) * 4
    assert rel_err(gpu.to_host(gpu.gelu(gpu.from_host(x))), gelu(x)) < 1e-6


def test_encoder_linear_and_residual_norm(gpu):
    """The encoder's fused forms (linear with its bias, layer norm of x + residual) against the twins."""
    x, bias, residual, w = f32(40, 64), f32(64), f32(40, 64), f32(64)
    tensor = random_weight(Q.F32, 64, 64)
    got = gpu.to_host(gpu.linear(gpu.from_host(x), gpu.load_weight(tensor), gpu.from_host(bias)))
    assert rel_err(got, linear(x, dequantize(tensor.raw, Q.F32).reshape(64, 64), bias)) < 2e-6
    got = gpu.to_host(gpu.layer_norm(gpu.from_host(x), gpu.from_host(w), gpu.from_host(bias), 1e-12,
                                     residual=gpu.from_host(residual)))
    assert rel_err(got, layer_norm(x, w, bias, 1e-12, residual)) < 2e-6
    got = gpu.to_host(gpu.linear(gpu.from_host(x), gpu.load_weight(tensor), gpu.from_host(bias),
                                 norm=(gpu.from_host(residual), gpu.from_host(w), gpu.from_host(bias), 1e-12)))
    want = linear(x, dequantize(tensor.raw, Q.F32).reshape(64, 64), bias, norm=(residual, w, bias, 1e-12))
    assert rel_err(got, want) < 2e-6


@pytest.mark.parametrize("d_head", [32, 64])
@pytest.mark.parametrize("lengths", [[1], [5, 64, 65, 1, 256], [200] * 9])
def test_encoder_attention(gpu, d_head, lengths):
    heads = 3
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    q, k, v = (f32(int(offsets[-1]), heads * d_head) for _ in range(3))
    got = gpu.to_host(gpu.encoder_attention(gpu.from_host(q), gpu.from_host(k), gpu.from_host(v), offsets, heads, 0.2))
    assert rel_err(got, encoder_attention(q, k, v, offsets, heads, 0.2)) < 2e-6


@pytest.mark.parametrize("n", [1, 7])
def test_qk_norm_neox_rope_and_cache_store_in_one_launch(gpu, n):
    """Gemma's attention entry: RMSNorm of each query and key head, NeoX rope of both and the cache store, one rope
    launch; the normalized heads are still written for whoever reads them."""
    heads, n_kv, d, eps = 4, 1, 256, 1e-6
    cache = KVCache(1, n_kv, d, d, n_ctx=64, block_size=16, ops=gpu)
    seq = cache.new_sequence()
    cache.prepare([(seq, list(range(21)))])
    batch = cache.prepare([(seq, list(range(n)))])
    q, k, v = f32(n, heads, d), f32(n, n_kv, d), f32(n, n_kv, d)
    wq, wk = rng.uniform(0.5, 1.5, d).astype(np.float32), rng.uniform(0.5, 1.5, d).astype(np.float32)
    dq, dk, dv, dwq, dwk = (gpu.from_host(a) for a in (q, k, v, wq, wk))
    outs = {}

    def step():
        qn, kn = gpu.rms_norm(dq, dwq, eps), gpu.rms_norm(dk, dwk, eps)
        q_rot = gpu.rope(qn, batch.positions, 10000.0, True, d)
        k_rot = gpu.rope(kn, batch.positions, 10000.0, True, d)
        gpu.kv_write(cache, 0, batch, k_rot, dv)
        outs.update(qn=qn, kn=kn, q_rot=q_rot, k_rot=k_rot)

    kernels = [kernel for _, kernel, _ in gpu.profile(step)[1]]
    assert kernels == ["rope"]
    host = {name: gpu.to_host(a) for name, a in outs.items()}
    for name, x, w in (("q", q, wq), ("k", k, wk)):
        normed = rms_norm(x, w, eps)
        assert rel_err(host[f"{name}n"], normed) < 1e-6, name
        assert rel_err(host[f"{name}_rot"], rope(normed, batch.positions, 10000.0, True)) < 1e-5, name
    assert np.array_equal(gpu.to_host(cache.k[0])[batch.slots], host["k_rot"])
    assert np.array_equal(gpu.to_host(cache.v[0])[batch.slots], v)


def test_post_norm_and_residual_add_in_one_launch(gpu):
    """Gemma's sandwich norm: RMSNorm of a sublayer's output and the residual add behind it, one launch."""
    x, w, resid = f32(1, 640), rng.uniform(0.5, 1.5, 640).astype(np.float32), f32(1, 640)
    dx, dw, dr = gpu.from_host(x), gpu.from_host(w), gpu.from_host(resid)
    outs = {}

    def step():
        outs["normed"] = gpu.rms_norm(dx, dw, 1e-6)
        outs["sum"] = gpu.add(dr, outs["normed"])

    kernels = [kernel for _, kernel, _ in gpu.profile(step)[1]]
    assert kernels == ["rms_norm"]
    normed = rms_norm(x, w, 1e-6)
    assert rel_err(gpu.to_host(outs["normed"]), normed) < 1e-6
    assert rel_err(gpu.to_host(outs["sum"]), add(resid, normed)) < 1e-6
