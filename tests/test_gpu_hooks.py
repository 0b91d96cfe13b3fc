"""Hooks on a GPU backend: activations stay on the device (counted), DLPack to torch without a copy, device edits
equal host edits, batched runs equal solo runs, batched sweeps equal one patch at a time. Skips without a GPU.

``ROCMFORGE_TWIN`` may name a GGUF to use instead of SmolLM2 (the lent GPU machine runs on its shape twin); on
HIP-CPU (``tests/gpu_runtimes.py``) a 10-layer tiny model of the same weight type stands in."""
from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from rocmforge import edits
from rocmforge.patching import logit_diff, patch_heads, patch_residual
from tests.gpu_runtimes import gpu_device
from tests.tiny_gguf import write_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def device() -> str:
    return gpu_device()


@pytest.fixture(scope="module")
def path(request, device, tmp_path_factory):
    if os.environ.get("ROCMFORGE_TWIN"):
        return os.environ["ROCMFORGE_TWIN"]
    if device == "hip-cpu":  # emulated kernels are slow: a 10-layer model of SmolLM2's type, not SmolLM2
        return write_model(tmp_path_factory.mktemp("tiny") / "tiny10.gguf", d_model=256, n_heads=8, n_kv_heads=4,
                           d_ff=256, vocab=1000, n_layers=10, weight_type=Q.Q4_1, tokenizer=True)
    return request.getfixturevalue("smollm2_path")


@pytest.fixture(scope="module")
def gpu(path, device):
    import rocmforge
    return rocmforge.load(path, device=device, n_ctx=256, n_parallel=8)


@pytest.fixture(scope="module")
def cpu(path, gpu):
    import rocmforge
    return rocmforge.load(path, device="cpu", n_ctx=256, n_parallel=8)


def _close(got, want, share: float = 0.05) -> None:
    """Equal up to ``share`` of the largest magnitude: GPU and CPU kernels sum in different orders, and llama.cpp's
    8-bit activation rounding turns last-bit differences into visible ones (more so on a random-weight twin)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    finite = np.isfinite(want)
    assert np.array_equal(finite, np.isfinite(got))  # the same -inf mask
    np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=share * max(1.0, np.abs(want[finite]).max()))


def _ids(model, n: int = 24, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(100, model.cfg.vocab_size - 100, n).tolist()


def test_an_unfiltered_cache_never_leaves_the_device(gpu):
    from rocmforge.backends.device_memory import DeviceArray
    rt, copies = gpu.ops.rt, []
    original = rt.copy_to_host

    def counting(host, address):
        copies.append(host.nbytes)
        return original(host, address)
    rt.copy_to_host = counting
    try:
        logits, cache = gpu.run_with_cache(_ids(gpu))
        rt.synchronize()
        assert copies == []  # every hook point cached, logits included: nothing crossed to the host
        assert len(cache) == len(gpu.hook_names()) and all(isinstance(cache[n], DeviceArray) for n in cache)
        assert isinstance(logits, DeviceArray)
        cache["resid_post", 3].numpy()
        assert len(copies) == 1  # only when asked
    finally:
        rt.copy_to_host = original


def test_gpu_cache_matches_the_numpy_backend(gpu, cpu):
    ids = _ids(gpu)
    names = ["blocks.2.hook_resid_post", "blocks.5.attn.hook_pattern", "blocks.5.attn.hook_attn_scores",
             "blocks.7.attn.hook_z", "blocks.9.mlp.hook_post"]
    _, mine = gpu.run_with_cache(ids, names_filter=names)
    _, ref = cpu.run_with_cache(ids, names_filter=names)
    for name in names:
        _close(mine[name].numpy(), ref[name])


def test_torch_reads_the_cache_without_a_copy_and_a_hook_may_return_a_torch_tensor(gpu):
    torch = pytest.importorskip("torch")
    ids = _ids(gpu)
    logits, cache = gpu.run_with_cache(ids, names_filter="blocks.4.hook_resid_post")
    entry = cache["resid_post", 4]
    t = torch.from_dlpack(entry)
    assert t.device.type == "cuda" and t.data_ptr() == entry.address and tuple(t.shape) == entry.shape
    assert np.array_equal(t.cpu().numpy(), entry.numpy())
    with_torch = gpu.run_with_hooks(ids, [("blocks.4.hook_resid_post", lambda act, hook: torch.from_dlpack(act) * 2)])
    # the same edit as a device hook via torch and as a host hook
    gpu.reset_hooks()
    gpu.add_hook("blocks.4.hook_resid_post", lambda act, hook: torch.from_dlpack(act) * 2, on_device=True)
    on_device = gpu.forward(ids)
    gpu.reset_hooks()
    np.testing.assert_array_equal(on_device, with_torch)
    assert np.abs(on_device - np.asarray(logits)).max() > 0.1


@pytest.mark.parametrize("make", ["zero", "mean", "steer", "patch", "scale"])
def test_device_edits_equal_the_same_edit_on_the_host(gpu, make):
    ids = _ids(gpu)
    _, clean = gpu.run_with_cache(_ids(gpu, seed=1), names_filter=["blocks.3.attn.hook_z", "blocks.6.hook_resid_pre"])
    z_name, resid_name = "blocks.3.attn.hook_z", "blocks.6.hook_resid_pre"
    clean_z, clean_resid = clean[z_name].numpy(), clean[resid_name].numpy()
    vector = np.random.default_rng(3).standard_normal(gpu.cfg.d_model).astype(np.float32)
    cases = {
        "zero": (z_name, edits.zero_ablate(heads=[1, 4]), lambda a: _set(a, (slice(None), [1, 4]), 0)),
        "mean": (resid_name, edits.mean_ablate(clean_resid.mean(0), positions=[2, 5]),
                 lambda a: _set(a, [2, 5], clean_resid.mean(0))),
        "steer": (resid_name, edits.add_vector(vector, scale=4.0), lambda a: a + np.float32(4.0) * vector),
        "patch": (z_name, edits.patch_from(clean[z_name], heads=[2]),
                  lambda a: _set(a, (slice(None), 2), clean_z[:, 2])),
        "scale": (z_name, edits.scale_heads(3.0, heads=[0]), lambda a: _set(a, (slice(None), 0), a[:, 0] * 3)),
    }
    name, device_edit, host_edit = cases[make]
    on_device = gpu.run_with_hooks(ids, [(name, device_edit)])
    on_host = gpu.run_with_hooks(ids, [(name, lambda act, hook: host_edit(act.copy()))])
    _close(on_device, on_host, 1e-4)  # the same edit: only an fma in the steering add may round differently
    assert np.abs(on_device - gpu.forward(ids)).max() > 1e-3  # the edit did something


def _set(a: np.ndarray, where, value) -> np.ndarray:
    a[where] = value
    return a


def test_a_batch_of_prompts_equals_each_solo_run(gpu):
    prompts = [_ids(gpu, 7, seed=4), _ids(gpu, 30, seed=5), _ids(gpu, 1, seed=6)]
    names = ["blocks.1.hook_resid_post", "blocks.8.attn.hook_pattern", "hook_logits"]
    logits, cache = gpu.run_with_cache(prompts, names_filter=names)
    assert logits.shape[:2] == (3, 30) and cache.mask.sum(1).tolist() == [7, 30, 1]
    padded = np.asarray(cache["blocks.8.attn.hook_pattern"])
    for i, ids in enumerate(prompts):
        _, solo = gpu.run_with_cache(ids, names_filter=names)
        for name in names:
            _close(cache.prompt(i)[name].numpy(), solo[name].numpy())
        t = len(ids)
        _close(padded[i, :, :t, :t], solo["blocks.8.attn.hook_pattern"].numpy())
        assert not padded[i, :, t:].any() and not padded[i, :, :, t:].any()


def test_batched_sweeps_equal_one_patch_at_a_time(gpu):
    clean = _ids(gpu, 12, seed=7)
    corrupted = list(clean)
    corrupted[4] += 1
    metric = logit_diff(5, 6)
    layers = [0, gpu.cfg.n_layers // 2, gpu.cfg.n_layers - 1]
    batched = patch_residual(gpu, clean, corrupted, metric, layers=layers)
    alone = patch_residual(gpu, clean, corrupted, metric, layers=layers, max_batch=1)
    _close(batched, alone)
    _close(patch_heads(gpu, clean, corrupted, metric, layers=[3]),
           patch_heads(gpu, clean, corrupted, metric, layers=[3], max_batch=1))
