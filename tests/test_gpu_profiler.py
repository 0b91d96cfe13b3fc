"""The profiler on the numpy backend (wall clock per op); the GPU path (device events per kernel) runs in
benchmarks/gpu_decode.py on the device."""
from __future__ import annotations

import pytest

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
