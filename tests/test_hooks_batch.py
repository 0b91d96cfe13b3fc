"""Batched run_with_cache / run_with_hooks, device hooks and the built-in edits, on SmolLM2 (CPU backends), and a
counting check that the caching hook never asks a backend for a host copy."""
from __future__ import annotations

import numpy as np
import pytest

from rocmforge import edits
from rocmforge.hooks import Hooks, device_caching_hook, hook_names

TEXTS = ["The capital of France is", "Hi", "Once upon a time, in a land far away, there lived a"]


class _NoHostCopies:
    def to_host(self, x):
        raise AssertionError("an activation was copied to the host")

    def snapshot(self, x):
        return x


def test_the_caching_hook_never_copies_to_the_host():
    backend = _NoHostCopies()
    hooks = Hooks(backend=backend)
    store: dict = {}
    hooks.add(lambda name: True, device_caching_hook(store, backend))
    acts = {name: object() for name in hook_names(2)}
    assert all(hooks(name, x) is x for name, x in acts.items())
    assert all(store[name] == [x] for name, x in acts.items())


@pytest.fixture(scope="module", params=["cpu", "cpu-exact"])
def model(request, smollm2_path):
    import rocmforge
    return rocmforge.load(smollm2_path, device=request.param, n_ctx=128, n_parallel=4)


def test_each_prompt_of_a_batch_equals_its_solo_run_bit_for_bit(model):
    prompts = [model.tokenize(t) for t in TEXTS]
    logits, batch = model.run_with_cache(prompts)
    longest = max(map(len, prompts))
    assert logits.shape == (3, longest, model.cfg.vocab_size)
    assert batch.mask.tolist() == [[i < len(p) for i in range(longest)] for p in prompts]
    assert batch["pattern", 4].shape == (3, model.cfg.n_heads, longest, longest)
    for i, ids in enumerate(prompts):
        solo_logits, solo = model.run_with_cache(ids)
        own = batch.prompt(i)
        assert set(own) == set(solo)
        for name in solo:
            assert np.array_equal(own[name], solo[name]), name
        t = len(ids)
        assert np.array_equal(logits[i, :t], solo_logits) and not logits[i, t:].any()
        assert np.array_equal(batch["resid_post", 7][i, :t], solo["resid_post", 7])
        assert np.array_equal(batch["pattern", 4][i, :, :t, :t], solo["pattern", 4])
    hooked = model.run_with_hooks(prompts, [("blocks.2.hook_mlp_out", edits.zero_ablate())], padded=False)
    for ids, row in zip(prompts, hooked):
        assert np.array_equal(row, model.run_with_hooks(ids, [("blocks.2.hook_mlp_out", lambda a, h: a * 0)]))


def test_names_filter_and_device_choice(model):
    ids = model.tokenize(TEXTS[0])
    _, one = model.run_with_cache(ids, names_filter="blocks.3.hook_resid_post")
    _, some = model.run_with_cache(ids, names_filter=["blocks.3.hook_resid_post", "hook_embed"], device="cpu")
    _, pred = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_z"))
    assert list(one) == ["blocks.3.hook_resid_post"] and set(some) == {"blocks.3.hook_resid_post", "hook_embed"}
    assert len(pred) == model.cfg.n_layers and isinstance(some["embed"], np.ndarray)
    assert np.shares_memory(np.from_dlpack(one["resid_post", 3]), one["resid_post", 3])  # DLPack on the CPU too
    with pytest.raises(ValueError, match="give None or 'cpu'"):
        model.run_with_cache(ids, device="cuda:1")


def test_built_in_edits_equal_the_same_edit_written_in_numpy(model):
    ids = model.tokenize(TEXTS[2])
    z, resid = "blocks.3.attn.hook_z", "blocks.6.hook_resid_pre"
    _, other = model.run_with_cache(model.tokenize(TEXTS[2].replace("far", "near")), names_filter=[z, resid])
    vector = np.random.default_rng(3).standard_normal(model.cfg.d_model).astype(np.float32)
    mean = other[resid].mean(0)

    def host(where, value):
        def fn(act, hook):
            act = act.copy()
            act[where] = value(act) if callable(value) else value
            return act
        return fn
    cases = [
        (z, edits.zero_ablate(heads=[1, 4]), host((slice(None), [1, 4]), 0.0)),
        (resid, edits.mean_ablate(mean, positions=[2, -1]), host([2, -1], mean)),
        (resid, edits.add_vector(vector, 4.0), lambda act, hook: act + np.float32(4.0) * vector),
        (z, edits.patch_from(other[z], heads=[2]), host((slice(None), 2), other[z][:, 2])),
        (z, edits.scale_heads(3.0, heads=[0]), host((slice(None), 0), lambda a: np.float32(3.0) * a[:, 0])),
        ("blocks.5.attn.hook_pattern", edits.zero_ablate(heads=[7], positions=[-1]), host((7, -1), 0.0)),
    ]
    plain = model.forward(ids)
    for name, edit, numpy_edit in cases:
        on_device = model.run_with_hooks(ids, [(name, edit)])
        assert np.array_equal(on_device, model.run_with_hooks(ids, [(name, numpy_edit)])), edit
        assert np.abs(on_device - plain).max() > 1e-3
    # a device hook may return any DLPack array (here numpy's own)
    doubled = model.run_with_hooks(ids, [("blocks.4.hook_resid_post", lambda a, h: a * 2)])
    model.add_hook("blocks.4.hook_resid_post", lambda a, h: np.from_dlpack(a) * 2, on_device=True)
    try:
        assert np.array_equal(model.forward(ids), doubled)
    finally:
        model.reset_hooks()
