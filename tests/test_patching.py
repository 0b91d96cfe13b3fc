"""Activation patching and steering on SmolLM2: facts that follow from how the residual stream works."""
from __future__ import annotations

import numpy as np
import pytest

from rocmforge.patching import logit_diff, patch_heads, patch_residual, steering, steering_vector

pytestmark = pytest.mark.model_text  # stored references: .ci/run repeats it under another BLAS kernel

# Two prompts that differ in exactly one token (position 3: " France" vs " Italy").
CLEAN = "The capital of France is the city of"
CORRUPTED = "The capital of Italy is the city of"


@pytest.fixture(scope="module")
def model(smollm2_path):
    import rocmforge
    return rocmforge.load(smollm2_path, device="cpu", n_ctx=256, n_parallel=4)


@pytest.fixture(scope="module")
def pair(model):
    clean, corrupted = model.tokenize(CLEAN), model.tokenize(CORRUPTED)
    differ = [i for i, (a, b) in enumerate(zip(clean, corrupted)) if a != b]
    assert len(clean) == len(corrupted) and len(differ) == 1
    metric = logit_diff(model.tokenize(" Paris")[0], model.tokenize(" Rome")[0])
    return clean, corrupted, differ[0], metric, metric(model.forward(clean)), metric(model.forward(corrupted))


def test_the_pair_disagrees(pair):
    *_, clean_metric, corrupted_metric = pair
    assert clean_metric > 2 and corrupted_metric < -2  # Paris for France, Rome for Italy


def test_patching_the_clean_run_into_itself_gives_the_clean_metric_everywhere(model, pair):
    clean, _, _, metric, clean_metric, _ = pair
    grid = patch_residual(model, clean, clean, metric, layers=[20, 29], max_batch=1)  # later layers: shorter runs
    assert grid.shape == (2, len(clean))
    assert np.all(grid == clean_metric)  # bit for bit: each patched run has the clean run's shapes
    heads = patch_heads(model, clean, clean, metric, layers=[27, 29], max_batch=1)
    assert heads.shape == (2, model.cfg.n_heads)
    assert np.all(heads == clean_metric)


def test_at_layer_0_only_the_differing_token_matters(model, pair):
    clean, corrupted, differ, metric, clean_metric, corrupted_metric = pair
    row = patch_residual(model, clean, corrupted, metric, layers=[0], max_batch=1)[0]
    # The embeddings differ only there: patching it IS the clean run; patching elsewhere changes nothing.
    assert row[differ] == clean_metric
    assert np.all(np.delete(row, differ) == corrupted_metric)


def test_the_last_residual_at_the_last_position_decides_the_logits(model, pair):
    clean, corrupted, _, metric, clean_metric, corrupted_metric = pair
    last = model.cfg.n_layers - 1
    grid = patch_residual(model, clean, corrupted, metric, activation="resid_post", layers=[last], positions=[-1, 0],
                          max_batch=1)
    assert grid[0].tolist() == [clean_metric, corrupted_metric]


def test_starting_at_the_patched_layer_equals_a_full_hooked_run(model, pair):
    clean, corrupted, _, metric, _, _ = pair
    layer, pos, head = 23, 4, 4
    grid = patch_residual(model, clean, corrupted, metric, layers=[layer], positions=[pos - 1, pos], max_batch=1)
    heads = patch_heads(model, clean, corrupted, metric, layers=[layer], heads=[head], max_batch=1)
    names = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_z"]
    _, cache = model.run_with_cache(clean, names_filter=names)

    def put_resid(act, hook):
        act = act.copy()
        act[pos] = cache[hook.name][pos]
        return act

    def put_head(act, hook):
        act = act.copy()
        act[:, head] = cache[hook.name][:, head]
        return act

    one_resid = metric(model.run_with_hooks(corrupted, [(f"blocks.{layer}.hook_resid_pre", put_resid)]))
    one_head = metric(model.run_with_hooks(corrupted, [(f"blocks.{layer}.attn.hook_z", put_head)]))
    assert [grid[0, 1], heads[0, 0]] == [one_resid, one_head]
    assert not np.isclose(grid[0, 0], grid[0, 1], atol=0.05)  # different positions give different answers


def test_patching_needs_prompts_of_equal_length(model, pair):
    clean, corrupted, _, metric, _, _ = pair
    with pytest.raises(ValueError, match="same number of tokens"):
        patch_residual(model, clean, corrupted[:-1], metric, layers=[0])
    with pytest.raises(ValueError, match="per-head patching works on"):
        patch_heads(model, clean, corrupted, metric, activation="resid_pre")


def test_steering_adds_the_direction_in_prefill_and_every_decode_step(model):
    layer, scale = 3, 1.0
    direction = steering_vector(model, model.tokenize("I love"), model.tokenize("I hate"), layer)
    assert direction.shape == (model.cfg.d_model,) and np.linalg.norm(direction) > 0
    prompt = model.tokenize("I hate you because")
    name = f"blocks.{layer}.hook_resid_pre"
    before: list[np.ndarray] = []
    after: list[np.ndarray] = []
    gen = model.start(prompt, max_new_tokens=4, temperature=0)
    with model.hooks([(name, lambda act, hook: before.append(act.copy()))]):
        with steering(model, direction, layer, scale):  # hooks on one name run in the order they were added
            with model.hooks([(name, lambda act, hook: after.append(act.copy()))]):
                while gen.step() is not None:
                    pass
    steered_tokens = gen.state.tokens
    gen.close()
    assert [a.shape[0] for a in after] == [len(prompt), 1, 1, 1]  # the prefill, then three decode steps
    for b, a in zip(before, after):
        np.testing.assert_allclose(a - b, np.broadcast_to(scale * direction, a.shape), rtol=1e-5, atol=1e-4)
    assert not model.hook_registry.active
    plain = model.start(prompt, max_new_tokens=4, temperature=0)
    while plain.step() is not None:
        pass
    assert plain.state.tokens != steered_tokens
    plain.close()


@pytest.fixture(scope="module")
def smooth_model(smollm2_path):
    """SmolLM2 without llama.cpp's 8-bit activation rounding, which turns last-bit differences between two
    computation orders into logit changes of up to ~0.2; without it they stay float32 noise."""
    import rocmforge
    m = rocmforge.load(smollm2_path, device="cpu", n_ctx=256, n_parallel=4)
    m.ops.round_activations = False
    return m


def test_batched_sweeps_equal_one_patch_at_a_time(smooth_model, pair):
    # Batched: every position (head) of a layer in one forward, positions before a patch reused from the corrupted
    # run (its keys and values); one at a time: each patch its own full run from the patched layer.
    model = smooth_model
    clean, corrupted, differ, metric, _, _ = pair
    layers = [0, 14, 29]
    batched = patch_residual(model, clean, corrupted, metric, layers=layers)
    alone = patch_residual(model, clean, corrupted, metric, layers=layers, max_batch=1)
    np.testing.assert_allclose(batched, alone, rtol=0, atol=2e-3)
    assert abs(batched[0, differ] - batched[0, 0]) > 5  # the differing token carries the answer
    heads = patch_heads(model, clean, corrupted, metric, layers=[14, 28])
    heads_alone = patch_heads(model, clean, corrupted, metric, layers=[14, 28], max_batch=1)
    np.testing.assert_allclose(heads, heads_alone, rtol=0, atol=2e-3)


def test_on_cpu_exact_batched_sweeps_equal_one_patch_at_a_time_bit_for_bit(smollm2_path, pair):
    # cpu-exact's Q4_1/Q8_0 products give each row the same bits whatever rows share the call, so reusing the
    # corrupted run's prefix and batching every patch of a layer changes nothing
    import rocmforge
    model = rocmforge.load(smollm2_path, device="cpu-exact", n_ctx=256, n_parallel=12)
    clean, corrupted, _, metric, _, _ = pair
    assert np.array_equal(patch_residual(model, clean, corrupted, metric, layers=[5, 20]),
                          patch_residual(model, clean, corrupted, metric, layers=[5, 20], max_batch=1))
    assert np.array_equal(patch_heads(model, clean, corrupted, metric, layers=[23]),
                          patch_heads(model, clean, corrupted, metric, layers=[23], max_batch=1))
