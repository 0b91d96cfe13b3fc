"""The batched decode step on the GPU (``GpuBackend.graph_step_batch``): its kernels against the numpy twins and
the host sampler, batch invariance (a sequence's logits the same bits alone or inside a batch of 64), and
``step_all`` through the replayed graph. Skipped, with the reason, without a GPU; on the lent GPU run by
``benchmarks/gpu_side_by_side.sh tests``, which also passes the shape twins of SmolLM2 and Gemma 3 through
``$ROCMFORGE_TWIN_DIR`` (``<name>.gguf``) so the model tests run on their real shapes there.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from rocmforge.arch.context import ForwardContext
from rocmforge.backends.cpu import CpuBackend
from rocmforge.engine import Generation, step_all
from rocmforge.gguf_file import GGUFFile
from rocmforge.hooks import Hooks
from rocmforge.kv_cache import Batch, KVCache
from rocmforge.model import ARCHITECTURES
from rocmforge.ops.attention import attention
from rocmforge.ops.matmul import round_activations
from rocmforge.ops.sample_rows import sample_rows
from rocmforge.sampler import Sampler, SamplingParams
from rocmforge.weights import Weights
from tests.test_gpu_kernels import MATMUL_TYPES, f32, random_weight, rel_err
from tests.gpu_runtimes import gpu_runtime
from tests.test_sample_rows import SAMPLING, EveryThirdToken, FixedDraw, kernel_inputs, mirror_samplers
from tests.test_sample_rows import case as sample_case
from tests.tiny_gguf import write_model

pytestmark = pytest.mark.gpu
rng = np.random.default_rng()


def make_gpu(round_activations: bool = True):
    from rocmforge.backends.gpu import GpuBackend
    return GpuBackend(gpu_runtime(), round_activations=round_activations)


@pytest.fixture(scope="module")
def gpu():
    return make_gpu()


# --- kernels ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ggml_type", MATMUL_TYPES, ids=lambda t: t.name)
def test_matvec_rows_matches_numpy_and_each_row_is_independent(gpu, ggml_type):
    """matvec_rows over 37 rows (5 staged chunks) equals numpy; any row alone gives the same bits."""
    tensor = random_weight(ggml_type, 300, 1536)
    w = dequantize(tensor.raw, ggml_type).reshape(300, 1536).astype(np.float64)
    weight, x = gpu.load_weight(tensor), f32(37, 1536)
    gpu._rows = SimpleNamespace()  # what a batched decode step sets: every matmul runs as matvec_rows
    try:
        got = gpu.to_host(gpu.matmul(gpu.from_host(x), weight))
        alone = gpu.to_host(gpu.matmul(gpu.from_host(x[21:22]), weight))
    finally:
        gpu._rows = None
    assert rel_err(got, round_activations(x, ggml_type).astype(np.float64) @ w.T) < 2e-5
    np.testing.assert_array_equal(alone[0], got[21])


def paged_cache(gpu, lengths: list[int], n_kv: int, d: int) -> tuple[KVCache, list[int], list[np.ndarray], list[np.ndarray]]:
    """A cache holding random keys/values for sequences of ``lengths`` (their blocks interleaved in the pool)."""
    cache = KVCache(1, n_kv, d, d, n_ctx=1024, n_blocks=len(lengths) * 64, block_size=16, ops=gpu)
    seqs, keys, values = [cache.new_sequence() for _ in lengths], [], []
    for step in range(0, max(lengths), 16):  # grow every sequence 16 positions at a time
        for i, (seq, n) in enumerate(zip(seqs, lengths)):
            if step >= n:
                continue
            batch = cache.prepare([(seq, [1] * min(16, n - step))])
            k, v = f32(batch.n_tokens, n_kv, d), f32(batch.n_tokens, n_kv, d)
            gpu.kv_write(cache, 0, batch, gpu.from_host(k), gpu.from_host(v))
            keys.append((i, k)), values.append((i, v))
    per_seq_k = [np.concatenate([k for j, k in keys if j == i]) for i in range(len(lengths))]
    per_seq_v = [np.concatenate([v for j, v in values if j == i]) for i in range(len(lengths))]
    return cache, seqs, per_seq_k, per_seq_v


def attend_rows(gpu, cache: KVCache, batch, q: np.ndarray, scale: float, window, softcap) -> np.ndarray:
    from rocmforge.backends.gpu_graphs import bucket_for
    graph = gpu._new_rows_graph(bucket_for(len(batch.segments)), cache)
    greedy = SimpleNamespace(top_k=0, floats=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0), ids=(), uniform=0.0)
    gpu._fill_rows(graph, batch, cache, [greedy] * len(batch.segments))
    gpu._enter_rows(graph)
    try:
        padded = np.concatenate([q, np.repeat(q[:1], graph.rows - len(q), axis=0)])
        return gpu.to_host(gpu.attention(gpu.from_host(padded), cache, 0, graph.batch, scale, window, softcap))[:len(q)]
    finally:
        gpu._rows, gpu._static = None, []


@pytest.mark.parametrize("d,window,softcap,sms", [(64, None, None, None), (256, 50, None, None), (128, None, 30.0, None),
                                                  (64, None, None, 1)])
def test_attention_rows_matches_numpy_for_every_row(gpu, d, window, softcap, sms, monkeypatch):
    """One launch for 5 sequences of different lengths (up to 10 slices of 64 keys), GQA 8/2; each row alone gives
    the same bits as inside the batch. ``sms=1``: one block per (row, head) walks all of that row's slices."""
    if sms is not None:
        monkeypatch.setattr(gpu.rt, "multiprocessors", sms)
    heads, n_kv, lengths = 8, 2, [1, 37, 300, 600, 129]
    cache, seqs, keys, values = paged_cache(gpu, lengths, n_kv, d)
    batch = cache.prepare([(s, [1]) for s in seqs])
    k_new, v_new = f32(len(seqs), n_kv, d), f32(len(seqs), n_kv, d)
    gpu.kv_write(cache, 0, batch, gpu.from_host(k_new), gpu.from_host(v_new))
    q = f32(len(seqs), heads, d)
    got = attend_rows(gpu, cache, batch, q, 0.1, window, softcap)
    for i, seg in enumerate(batch.segments):
        k, v = np.concatenate([keys[i], k_new[i:i + 1]]), np.concatenate([values[i], v_new[i:i + 1]])
        ref = attention(q[i:i + 1], k, v, seg.positions, 0.1, window, softcap)
        assert rel_err(got[i:i + 1], ref) < 1e-5, f"row {i} (length {lengths[i] + 1})"
    alone_batch = Batch(batch.tokens[3:4], batch.positions[3:4], batch.slots[3:4],
                        (replace(batch.segments[3], rows=slice(0, 1)),))
    alone = attend_rows(gpu, cache, alone_batch, q[3:4], 0.1, window, softcap)
    np.testing.assert_array_equal(alone[0], got[3])


def test_sample_rows_picks_the_host_samplers_token(gpu):
    """Each row's token equals rocmforge.sampler's for the same logits, history and uniform draw."""
    vocab, n_rows = 5000, 4 * len(SAMPLING)
    logits = (rng.standard_normal((n_rows, vocab)) * 3).astype(np.float32)
    logits[:, 100:103] = logits[:, 100:101]  # ties
    rows, expected = [], []
    for i in range(n_rows):
        params, u = SAMPLING[i % len(SAMPLING)], float(rng.random())
        history = list(rng.integers(0, vocab, 20))
        host = Sampler(params)
        host.rng = FixedDraw(u)
        expected.append(host.sample(logits[i], history))
        device = Sampler(params)
        device.rng = FixedDraw(u)
        rows.append(device.draw(device.device_row(history, vocab, 128)))
    cap = 128
    ids = np.zeros((n_rows, cap), np.int32)
    adjust = np.zeros((n_rows, cap, 2), np.float32)
    for i, r in enumerate(rows):
        ids[i, :len(r.ids)], adjust[i, :len(r.ids), 0], adjust[i, :len(r.ids), 1] = r.ids, r.bias, r.counts
    inputs = SimpleNamespace(
        iparams=gpu._upload(np.array([(r.top_k, len(r.ids)) for r in rows], np.int32)),
        fparams=gpu._upload(np.array([(*r.floats, r.uniform, 0.0) for r in rows], np.float32)),
        adjust_ids=gpu._upload(ids), adjust=gpu._upload(adjust), masks=None)
    got = gpu.to_host(gpu._sample_rows(gpu.from_host(logits), inputs))
    assert got.tolist() == expected


def test_sample_rows_applies_grammar_masks_like_the_host_sampler(gpu):
    """Rows with no mask, half the vocabulary, 3 tokens (fewer than top_k) and 1 token allowed: the kernel's token
    equals the host sampler's under the same mask (``Sampler.sample(mask=)``) and the numpy twin's."""
    logits, rows, masks, expected = sample_case(np.random.default_rng(1), 5000, 8 * len(SAMPLING))
    host_inputs = kernel_inputs(rows, masks, 5000)
    fparams, iparams, ids, adjust, words = (gpu._upload(a) for a in host_inputs)
    inputs = SimpleNamespace(iparams=iparams, fparams=fparams, adjust_ids=ids, adjust=adjust, masks=words)
    got = gpu.to_host(gpu._sample_rows(gpu.from_host(logits), inputs))
    assert got.tolist() == expected
    assert got.tolist() == sample_rows(logits, *host_inputs).tolist()


# --- the whole model --------------------------------------------------------------------------------------------
def model_files(tmp_path_factory) -> list[Path]:
    tiny = tmp_path_factory.mktemp("tiny")
    files = [write_model(tiny / "llama_q4_1.gguf", d_model=256, n_heads=4, n_kv_heads=2, d_ff=512, vocab=1000,
                         n_layers=3, weight_type=Q.Q4_1, seed=3)]
    twins = os.environ.get("ROCMFORGE_TWIN_DIR")
    if twins:
        files += sorted(Path(twins).glob("*.gguf"))
    return files


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    return model_files(tmp_path_factory)


def context(path: Path, ops, n_ctx: int, n_seqs: int) -> tuple[ForwardContext, object]:
    gguf = GGUFFile(path)
    cfg = gguf.config
    n_blocks = -(-n_ctx // 16) * n_seqs
    if hasattr(ops, "prepare"):
        ops.prepare(gguf, n_blocks * 16)
    kv = KVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim_v, n_ctx, n_blocks=n_blocks, block_size=16, ops=ops)
    return ForwardContext(cfg, Weights.load(gguf, ops), ops, kv, Hooks(ops)), ARCHITECTURES[cfg.architecture]


def prompt_length(gpu, i: int) -> int:
    """3..130 tokens; on HIP-CPU (slow) only every eighth prompt is long, which still spans several key slices."""
    return 3 + (i * 37) % 128 if gpu.rt.name != "hip-cpu" or i % 8 == 0 else 3 + i % 5


def prefilled(ctx, arch, n_seqs: int, seed: int, gpu) -> list[int]:
    """``n_seqs`` sequences with prompts of different lengths (``prompt_length`` for the ``gpu`` tested), prefilled."""
    r = np.random.default_rng(seed)
    seqs = []
    for i in range(n_seqs):
        seq = ctx.kv.new_sequence()
        arch.forward(ctx, ctx.kv.prepare([(seq, list(r.integers(0, ctx.cfg.vocab_size, prompt_length(gpu, i))))]))
        seqs.append(seq)
    return seqs


def test_batched_logits_are_batch_invariant(models):
    """A sequence's decode logits are the same bits alone (bucket 1), in a batch of 5 (bucket 8) and of 64."""
    for path in models:
        ops = make_gpu()
        ctx, arch = context(path, ops, 256, 64)
        seqs = prefilled(ctx, arch, 64, seed=1, gpu=ops)
        forward = lambda b: arch.forward(ctx, b, rows=b.last_rows)  # noqa: E731
        results = []
        for members in ([seqs[0]], seqs[:5], seqs):
            batch = ctx.kv.prepare([(s, [42 + i]) for i, s in enumerate(members)])
            results.append(ops.forward_rows(batch, forward, ctx.kv))
            for s in members:  # back to where it was, for the next batch
                ctx.kv.truncate(s, ctx.kv.length(s) - 1)
        np.testing.assert_array_equal(results[0][0], results[1][0], err_msg=f"{path.name}: alone vs 5")
        np.testing.assert_array_equal(results[1], results[2][:5], err_msg=f"{path.name}: 5 vs 64")


def test_batched_logits_match_numpy_without_rounding(models, monkeypatch):
    """The batched step computes what the numpy path computes (rounding off on both sides, as in
    test_gpu_model.py): 1e-3 relative on every row."""
    monkeypatch.setattr("rocmforge.backends.cpu.round_activations", lambda x, ggml_type: x)
    for path in models:
        ops = make_gpu(round_activations=False)
        ctx, arch = context(path, ops, 256, 6)
        cpu_ctx, _ = context(path, CpuBackend(), 256, 6)
        rows = []
        for c in (ctx, cpu_ctx):
            seqs = prefilled(c, arch, 6, seed=2, gpu=ops)
            batch = c.kv.prepare([(s, [42 + i]) for i, s in enumerate(seqs)])
            if c is ctx:
                rows.append(ops.forward_rows(batch, lambda b: arch.forward(ctx, b, rows=b.last_rows), ctx.kv))
            else:
                rows.append(arch.forward(c, batch, rows=batch.last_rows))
        errors = np.linalg.norm(rows[0] - rows[1], axis=-1) / np.linalg.norm(rows[1], axis=-1)
        print(f"{path.name}: batched GPU vs numpy, max relative logit error {errors.max():.2e}")
        assert errors.max() < 1e-3, path.name


def engine_model(ops, ctx, arch) -> SimpleNamespace:
    """What ``Generation`` and ``step_all`` read of a model, around a bare forward context."""
    return SimpleNamespace(ops=ops, ctx=ctx, kv=ctx.kv, arch=arch, cfg=ctx.cfg, n_ctx=256,
                           tokenizer=SimpleNamespace(eot_ids=set(), incremental_decoder=lambda: None))


def next_step_logits(ops, ctx, arch, gens) -> np.ndarray:
    """The logits of every generation's next decode step (taken with forward_rows), leaving the caches as they were."""
    batch = ctx.kv.prepare([(g.seq_id, g.tokens[-1:]) for g in gens])
    logits = ops.forward_rows(batch, lambda b: arch.forward(ctx, b, rows=b.last_rows), ctx.kv)
    for g in gens:
        ctx.kv.truncate(g.seq_id, ctx.kv.length(g.seq_id) - 1)
    return logits


def test_step_all_samples_on_the_device_like_the_host(models):
    """``step_all`` over 6 generations goes through the replayed graph; each token equals the host sampler's on the
    same step's logits (taken with forward_rows) with the same seed, greedy and sampled."""
    ops = make_gpu()
    ctx, arch = context(models[0], ops, 256, 6)
    model = engine_model(ops, ctx, arch)
    settings = [dict(temperature=0), dict(temperature=0.8, seed=5), dict(temperature=1.0, top_k=0, top_p=0.9, seed=6),
                dict(temperature=0, repeat_penalty=1.5), dict(temperature=0.7, min_p=0.1, seed=7),
                dict(temperature=0.9, logit_bias={5: 3.0}, seed=8)]
    gens = [Generation(model, list(range(3 + 5 * i, 12 + 5 * i)), SamplingParams(**s), 10) for i, s in enumerate(settings)]
    step_all(gens)  # the prompts (eager) and the first token, sampled on the host
    mirrors = mirror_samplers(gens)
    for _ in range(6):
        logits = next_step_logits(ops, ctx, arch, gens)
        expected = [m.sample(row, g.tokens) for m, row, g in zip(mirrors, logits, gens)]
        assert step_all(gens) == expected
        assert all(g.logits is None for g in gens)  # only ids came back
    assert [bucket for bucket, _ in ops._row_graphs] == [8]  # captured once (6 rows padded to 8), replayed after


def test_step_all_applies_grammar_masks_on_the_device(models):
    """Constrained generations (beside an unconstrained one) stay on the replayed graph: each token equals the
    host sampler's under the same mask on the same step's logits, and only ids come back."""
    ops = make_gpu()
    ctx, arch = context(models[0], ops, 256, 4)
    model = engine_model(ops, ctx, arch)
    vocab = ctx.cfg.vocab_size
    settings = [dict(temperature=0), dict(temperature=0.8, seed=5), dict(temperature=1.0, top_k=0, top_p=0.9, seed=6),
                dict(temperature=0.9, seed=8)]
    constraints = [EveryThirdToken(vocab), EveryThirdToken(vocab), EveryThirdToken(vocab), None]
    gens = [Generation(model, list(range(3 + 5 * i, 12 + 5 * i)), SamplingParams(**s), 10, constraint=c)
            for i, (s, c) in enumerate(zip(settings, constraints))]
    step_all(gens)  # the prompts (eager) and the first token, sampled on the host
    mirrors = mirror_samplers(gens)
    for _ in range(5):
        logits = next_step_logits(ops, ctx, arch, gens)
        masks = [c.mask() if c is not None else None for c in constraints]
        expected = [m.sample(row, g.tokens, mask) for m, row, g, mask in zip(mirrors, logits, gens, masks)]
        assert step_all(gens) == expected
        assert all(g.logits is None for g in gens)  # the graph ran: only ids came back
    assert all(len(c.accepted) == 6 for c in constraints[:3])
