"""The profiler on the numpy backend (wall clock per op); the GPU path (device events per kernel) runs in
benchmarks/gpu_decode.py on the device."""
from __future__ import annotations

import math
import time

import pytest

import rocmforge

from rocmforge.arch.context import ForwardContext
from rocmforge.backends.cpu import CpuBackend
from rocmforge.backends.profiler import profile_model
from rocmforge.gguf_file import GGUFFile
from rocmforge.hooks import Hooks
from rocmforge.kv_cache import KVCache
from rocmforge.model import ARCHITECTURES
from rocmforge.weights import Weights


@pytest.mark.slow
def test_cpu_profile_has_every_layer_and_op(smollm2_path):
    gguf = GGUFFile(smollm2_path)
    cfg, ops = gguf.config, CpuBackend()
    kv = KVCache(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim_v, 64, ops=ops)
    ctx = ForwardContext(cfg, Weights.load(gguf, ops), ops, kv, Hooks(ops))
    profile = profile_model(ctx, ARCHITECTURES[cfg.architecture], [1, 2, 3, 4, 5], n_tokens=2)
    assert {r.step for r in profile.rows} == {"prefill", "decode 0", "decode 1"}
    layers = profile.by_layer("decode 1")
    assert set(layers) == {"embed", "unembed"} | {f"layer {i}" for i in range(cfg.n_layers)}
    kernels = profile.by_kernel("decode 1")
    assert kernels["matmul"][0] == 7 * cfg.n_layers + 1  # q, k, v, o, gate, up, down per layer + the unembedding
    assert kernels["rms_norm"][0] == 2 * cfg.n_layers + 1
    assert all(r.ms >= 0 for r in profile.rows) and profile.total_ms > 0
    assert kv.sequences == []  # the profiled sequence was freed
    assert "decode (all steps)" in profile.table()


@pytest.mark.slow
def test_model_profile_rows_are_positive_and_add_up(smollm2_path):
    model = rocmforge.load(smollm2_path, device="cpu", n_ctx=64)
    start = time.perf_counter()
    profile = model.profile("The capital of France is", n_tokens=2)
    wall_ms = (time.perf_counter() - start) * 1e3
    assert profile.device == "cpu" and all(r.ms > 0 for r in profile.rows)
    every_layer = {"embed", "unembed"} | {f"layer {i}" for i in range(model.cfg.n_layers)}
    step_ms = []
    for step in ("prefill", "decode 0", "decode 1"):
        layers, kernels = profile.by_layer(step), profile.by_kernel(step)
        assert set(layers) == every_layer and all(ms > 0 for ms in layers.values())
        assert all(n > 0 and ms > 0 for n, ms in kernels.values())
        assert math.isclose(sum(layers.values()), sum(ms for _, ms in kernels.values()), rel_tol=1e-9)
        step_ms.append(sum(layers.values()))
    assert math.isclose(sum(step_ms), profile.total_ms, rel_tol=1e-9)
    # the timed ops run inside the call, so they add up to less than its wall time, and they are most of it
    assert 0.5 * wall_ms < profile.total_ms < wall_ms
    assert model.kv.sequences == []
