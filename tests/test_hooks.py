"""The hook registry and ActivationCache, first on a tiny numpy transformer, then on SmolLM2."""
from __future__ import annotations

import numpy as np
import pytest

from rocmforge.activation_cache import ActivationCache
from rocmforge.hooks import HookPoint, Hooks, act_name, caching_hook, hook_names, hook_shape

# --- a tiny transformer that names its intermediates like the real forward -------------------------

D, HEADS, D_HEAD, VOCAB, LAYERS = 8, 2, 4, 11, 2


def _rms(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)


class Toy:
    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        w = lambda *shape: rng.standard_normal(shape).astype(np.float32) * 0.5  # noqa: E731
        self.embed = w(VOCAB, D)
        self.layers = [dict(q=w(D, D), k=w(D, D), v=w(D, D), o=w(D, D), up=w(D, 16), down=w(16, D))
                       for _ in range(LAYERS)]
        self.hooks = Hooks(valid_names=hook_names(LAYERS))

    def unembed(self, resid: np.ndarray) -> np.ndarray:
        return _rms(resid) @ self.embed.T

    def forward(self, tokens: list[int]) -> np.ndarray:
        h, t = self.hooks, len(tokens)
        resid = h("hook_embed", self.embed[tokens])
        for i, p in enumerate(self.layers):
            resid = h(f"blocks.{i}.hook_resid_pre", resid)
            x = h(f"blocks.{i}.ln1.hook_normalized", _rms(resid))
            q = h(f"blocks.{i}.attn.hook_q", (x @ p["q"]).reshape(t, HEADS, D_HEAD))
            k = h(f"blocks.{i}.attn.hook_k", (x @ p["k"]).reshape(t, HEADS, D_HEAD))
            v = h(f"blocks.{i}.attn.hook_v", (x @ p["v"]).reshape(t, HEADS, D_HEAD))
            angle = np.arange(t, dtype=np.float32)[:, None, None]  # a rotation stand-in: scale by position
            q = h(f"blocks.{i}.attn.hook_rot_q", q * np.cos(angle / 4))
            k = h(f"blocks.{i}.attn.hook_rot_k", k * np.cos(angle / 4))
            scores = np.einsum("qhd,khd->hqk", q, k) / np.float32(np.sqrt(D_HEAD))
            scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
            scores = h(f"blocks.{i}.attn.hook_attn_scores", scores)
            pattern = np.exp(scores - scores.max(-1, keepdims=True))
            pattern = h(f"blocks.{i}.attn.hook_pattern", pattern / pattern.sum(-1, keepdims=True))
            z = h(f"blocks.{i}.attn.hook_z", np.einsum("hqk,khd->qhd", pattern, v))
            resid = h(f"blocks.{i}.hook_resid_mid", resid + h(f"blocks.{i}.hook_attn_out", z.reshape(t, D) @ p["o"]))
            x = h(f"blocks.{i}.ln2.hook_normalized", _rms(resid))
            post = h(f"blocks.{i}.mlp.hook_post", np.maximum(h(f"blocks.{i}.mlp.hook_pre", x @ p["up"]), 0))
            resid = h(f"blocks.{i}.hook_resid_post", resid + h(f"blocks.{i}.hook_mlp_out", post @ p["down"]))
        return h("hook_logits", h("ln_final.hook_normalized", _rms(resid)) @ self.embed.T)

    def run_with_cache(self, tokens: list[int]) -> tuple[np.ndarray, ActivationCache]:
        store: dict[str, np.ndarray] = {}
        with self.hooks.temporary([(lambda name: True, caching_hook(store))]):
            logits = self.forward(tokens)
        return logits, ActivationCache(store, LAYERS, self.unembed)


TOKENS = [1, 5, 2, 9, 3]


@pytest.fixture
def toy() -> Toy:
    return Toy()


# --- the registry ---------------------------------------------------------------------------------

def test_nothing_registered_returns_the_same_object() -> None:
    x = np.ones(3, np.float32)
    assert Hooks()("blocks.0.hook_resid_pre", x) is x


def test_identity_hooks_everywhere_leave_logits_bit_identical(toy: Toy) -> None:
    clean = toy.forward(TOKENS)
    seen: list[str] = []
    with toy.hooks.temporary([(lambda name: True, lambda act, hook: seen.append(hook.name)),
                              (lambda name: True, lambda act, hook: act)]):
        hooked = toy.forward(TOKENS)
    assert np.array_equal(hooked, clean)
    assert seen == hook_names(LAYERS)  # every point fired exactly once, in forward order


def test_returned_array_replaces_the_activation(toy: Toy) -> None:
    clean = toy.forward(TOKENS)
    with toy.hooks.temporary([("blocks.0.hook_attn_out", lambda act, hook: np.zeros_like(act))]):
        ablated, cache = toy.run_with_cache(TOKENS)
    assert not np.allclose(ablated, clean)
    # the replacement is what flows on: resid_mid = resid_pre + 0
    assert np.array_equal(cache["resid_mid", 0], cache["resid_pre", 0])


def test_hooks_on_one_name_run_in_registration_order_each_seeing_the_last_output() -> None:
    hooks = Hooks()
    hooks.add("hook_embed", lambda act, hook: act + 1)
    hooks.add("hook_embed", lambda act, hook: act * 10)
    assert hooks("hook_embed", np.zeros(2, np.float32)).tolist() == [10.0, 10.0]
    assert hooks("hook_logits", np.zeros(2, np.float32)).tolist() == [0.0, 0.0]


def test_filter_matches_are_recomputed_when_hooks_change() -> None:
    hooks = Hooks()
    fired: list[str] = []
    hooks.add(lambda name: name.endswith("hook_pattern"), lambda act, hook: fired.append(hook.name))
    hooks("blocks.3.attn.hook_pattern", np.zeros(1))
    hooks("blocks.3.attn.hook_z", np.zeros(1))
    handle = hooks.add("blocks.3.attn.hook_z", lambda act, hook: fired.append("z"))
    hooks("blocks.3.attn.hook_z", np.zeros(1))
    handle.remove()
    hooks("blocks.3.attn.hook_z", np.zeros(1))
    assert fired == ["blocks.3.attn.hook_pattern", "z"]


def test_hooks_are_gone_after_an_exception_inside_the_context(toy: Toy) -> None:
    def boom(act: np.ndarray, hook: HookPoint) -> None:
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        with toy.hooks.temporary([("blocks.1.hook_resid_pre", boom), ("hook_embed", lambda a, h: a)]):
            toy.forward(TOKENS)
    assert len(toy.hooks) == 0 and not toy.hooks.active
    toy.forward(TOKENS)  # runs cleanly again


def test_temporary_keeps_hooks_added_outside_it() -> None:
    hooks = Hooks()
    permanent = hooks.add("hook_embed", lambda act, hook: act + 1)
    with hooks.temporary([("hook_embed", lambda act, hook: act * 3)]):
        assert hooks("hook_embed", np.ones(1, np.float32)).tolist() == [6.0]
    assert hooks("hook_embed", np.ones(1, np.float32)).tolist() == [2.0]
    permanent.remove()
    permanent.remove()  # twice is harmless
    assert not hooks.active


def test_a_misspelt_name_is_rejected_and_nothing_is_left_registered(toy: Toy) -> None:
    with pytest.raises(KeyError, match="blocks.0.hook_resid_prе"):
        with toy.hooks.temporary([("hook_embed", lambda a, h: a), ("blocks.0.hook_resid_prе", lambda a, h: a)]):
            pass
    assert len(toy.hooks) == 0


def test_a_replacement_of_the_wrong_shape_is_an_error() -> None:
    hooks = Hooks()
    hooks.add("hook_embed", lambda act, hook: act[:1])
    with pytest.raises(ValueError, match=r"hook_embed returned shape \(1,\), expected \(2,\)"):
        hooks("hook_embed", np.zeros(2, np.float32))


def test_a_replacement_keeps_the_activation_dtype() -> None:
    hooks = Hooks()
    hooks.add("hook_embed", lambda act, hook: act.astype(np.float64) + 0.5)
    assert hooks("hook_embed", np.zeros(2, np.float32)).dtype == np.float32


class _Device:
    """A stand-in for a GPU array: the registry must only move hooked ones to the host."""
    def __init__(self, a: np.ndarray) -> None:
        self.a = a


class _CountingBackend:
    def __init__(self) -> None:
        self.to_host_ids: list[int] = []
        self.uploads = 0

    def to_host(self, x: _Device) -> np.ndarray:
        self.to_host_ids.append(id(x))
        return x.a.copy()

    def from_host(self, a: np.ndarray) -> _Device:
        self.uploads += 1
        return _Device(a)


def test_only_hooked_activations_cross_to_the_host_and_only_replacements_come_back() -> None:
    backend = _CountingBackend()
    hooks = Hooks(backend=backend)
    store: dict[str, np.ndarray] = {}
    hooks.add("blocks.0.hook_resid_pre", caching_hook(store))
    hooks.add("blocks.1.hook_resid_pre", lambda act, hook: act + 1)
    acts = {name: _Device(np.full(2, i, np.float32)) for i, name in enumerate(hook_names(2))}
    out = {name: hooks(name, x) for name, x in acts.items()}
    assert backend.to_host_ids == [id(acts["blocks.0.hook_resid_pre"]), id(acts["blocks.1.hook_resid_pre"])]
    assert backend.uploads == 1
    assert out["blocks.0.hook_resid_pre"] is acts["blocks.0.hook_resid_pre"]  # observed, not replaced
    assert out["blocks.1.hook_resid_pre"].a.tolist() == (acts["blocks.1.hook_resid_pre"].a + 1).tolist()
    assert all(out[n] is acts[n] for n in acts if n != "blocks.1.hook_resid_pre")


# --- names ------------------------------------------------------------------------------------------

def test_every_hook_name_has_a_documented_shape_and_its_layer() -> None:
    names = hook_names(3)
    assert len(names) == len(set(names)) == 3 + 3 * 17
    assert hook_shape("blocks.2.attn.hook_z") == "[pos, head, d_head_v]"
    assert all(hook_shape(n).startswith("[") for n in names)
    assert HookPoint("blocks.12.mlp.hook_post").layer == 12 and HookPoint("hook_embed").layer is None


def test_short_names_resolve_like_transformer_lens() -> None:
    assert act_name("resid_pre", 4) == "blocks.4.hook_resid_pre"
    assert act_name("rot_k", 1) == "blocks.1.attn.hook_rot_k"
    assert act_name("post", 0) == "blocks.0.mlp.hook_post"
    assert act_name("normalized", 2, "ln1") == "blocks.2.ln1.hook_normalized"
    assert act_name("embed") == "hook_embed" and act_name("ln_final") == "ln_final.hook_normalized"
    with pytest.raises(KeyError, match="per layer"):
        act_name("pattern")
    with pytest.raises(KeyError, match="unknown activation"):
        act_name("patern", 0)


# --- the cache ----------------------------------------------------------------------------------------

def test_cache_indexing_and_residual_identities(toy: Toy) -> None:
    logits, cache = toy.run_with_cache(TOKENS)
    assert len(cache) == len(hook_names(LAYERS))
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["resid_post", -1] is cache[f"blocks.{LAYERS - 1}.hook_resid_post"]
    assert np.array_equal(cache["resid_post", 0], cache["resid_pre", 1])
    assert np.array_equal(cache["logits"], logits)
    with pytest.raises(KeyError, match="not in this cache"):
        cache["blocks.7.hook_resid_pre"]


def test_accumulated_resid_stacks_layer_inputs_then_the_final_residual(toy: Toy) -> None:
    _, cache = toy.run_with_cache(TOKENS)
    acc = cache.accumulated_resid()
    assert acc.shape == (LAYERS + 1, len(TOKENS), D)
    assert np.array_equal(acc[0], cache["embed"]) and np.array_equal(acc[-1], cache["resid_post", LAYERS - 1])
    with_mid = cache.accumulated_resid(incl_mid=True)
    assert with_mid.shape == (2 * LAYERS + 1, len(TOKENS), D)
    assert np.array_equal(with_mid[1], cache["resid_mid", 0])
    assert cache.accumulated_resid(layer=1).shape == (1, len(TOKENS), D)


def test_logit_lens_of_the_last_layer_equals_the_logits(toy: Toy) -> None:
    logits, cache = toy.run_with_cache(TOKENS)
    lens = cache.logit_lens()
    assert lens.shape == (LAYERS + 1, len(TOKENS), VOCAB)
    assert np.array_equal(lens[-1], logits)
    assert np.allclose(cache.logit_lens(pos=-1), lens[:, -1], rtol=1e-5, atol=1e-6)


def test_cached_activations_are_copies_not_views_of_buffers_updated_in_place() -> None:
    hooks, store = Hooks(), {}
    hooks.add("hook_embed", caching_hook(store))
    buf = np.zeros(2, np.float32)
    hooks("hook_embed", buf)
    buf += 1
    assert store["hook_embed"].tolist() == [0.0, 0.0]


# --- on SmolLM2 ---------------------------------------------------------------------------------------

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model(smollm2_path):
    import rocmforge
    return rocmforge.load(smollm2_path, device="cpu", n_ctx=256)


@pytest.fixture(scope="module")
def run(model):
    """(ids, logits, full cache) of PROMPT, computed once."""
    ids = model.tokenize(PROMPT)
    logits, cache = model.run_with_cache(ids)
    return ids, logits, cache


def test_model_lists_every_hook_point_and_caches_each(model, run):
    _, _, cache = run
    assert model.hook_names() == hook_names(model.cfg.n_layers)
    assert set(cache) == set(model.hook_names())
    assert not model.hook_registry.active  # run_with_cache left nothing behind


def test_activation_shapes_match_the_documented_ones(model, run):
    ids, _, cache = run
    cfg, t = model.cfg, len(ids)
    sizes = {"pos": t, "key_pos": t, "d_model": cfg.d_model, "head": cfg.n_heads, "kv_head": cfg.n_kv_heads,
             "d_head": cfg.head_dim, "d_head_v": cfg.head_dim_v, "d_mlp": cfg.d_ff, "d_vocab": cfg.vocab_size}
    for name in model.hook_names():
        documented = tuple(sizes[axis] for axis in hook_shape(name).strip("[]").split(", "))
        assert cache[name].shape == documented, name


def test_residual_stream_is_one_stream(model, run):
    _, _, cache = run
    assert np.array_equal(cache["embed"], cache["resid_pre", 0])
    for i in range(model.cfg.n_layers):
        if i + 1 < model.cfg.n_layers:
            assert np.array_equal(cache["resid_post", i], cache["resid_pre", i + 1])
        assert np.array_equal(cache["resid_mid", i], cache["resid_pre", i] + cache["attn_out", i])
        assert np.array_equal(cache["resid_post", i], cache["resid_mid", i] + cache["mlp_out", i])


def test_attention_patterns_are_causal_distributions(model, run):
    ids, _, cache = run
    upper = np.triu(np.ones((len(ids), len(ids)), bool), k=1)
    for i in range(model.cfg.n_layers):
        pattern = cache["pattern", i]
        np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=0, atol=1e-5)
        assert np.all(pattern[:, upper] == 0) and np.all(pattern >= 0)
        assert np.all(np.isneginf(cache["attn_scores", i][:, upper]))


def test_identity_hooks_on_every_point_leave_logits_bit_identical(model, run):
    ids, logits, _ = run
    fired: list[str] = []
    hooked = model.run_with_hooks(ids, fwd_hooks=[(lambda name: True, lambda act, hook: fired.append(hook.name)),
                                                  (lambda name: True, lambda act, hook: act)])
    assert np.array_equal(hooked, logits)
    assert fired == model.hook_names()


def test_zero_ablating_layer_0_attention_changes_the_logits(model, run):
    ids, logits, _ = run
    with model.hooks([("blocks.0.hook_attn_out", lambda act, hook: np.zeros_like(act))]):
        ablated, cache = model.run_with_cache(ids, names_filter=lambda n: n.startswith("blocks.0.hook_resid"))
    assert np.array_equal(cache["resid_mid", 0], cache["resid_pre", 0])
    assert np.abs(ablated - logits).max() > 0.1
    assert np.array_equal(model.forward(ids), logits)  # and it is gone again


def test_logit_lens_of_the_last_layer_is_the_models_logits(model, run):
    ids, logits, cache = run
    lens = cache.logit_lens()
    assert lens.shape == (model.cfg.n_layers + 1, len(ids), model.cfg.vocab_size)
    assert np.array_equal(lens[-1], logits)
    assert not np.allclose(lens[0], logits)  # the embedding alone predicts something else


def test_hooks_are_removed_when_a_hook_raises(model, run):
    ids, logits, _ = run

    def fail(act: np.ndarray, hook: HookPoint) -> None:
        raise ArithmeticError(f"failed at {hook.name}")

    with pytest.raises(ArithmeticError, match="blocks.5.hook_mlp_out"):
        with model.hooks([("blocks.5.hook_mlp_out", fail), ("hook_embed", lambda act, hook: act * 0)]):
            model.forward(ids)
    assert len(model.hook_registry) == 0 and not model.hook_registry.active
    assert np.array_equal(model.forward(ids), logits)


def test_permanent_hooks_stay_until_removed_or_reset(model, run):
    ids, logits, _ = run
    handle = model.add_hook("blocks.3.hook_resid_post", lambda act, hook: act * 0)
    with model.hooks([("hook_embed", lambda act, hook: None)]):
        pass
    assert np.array_equal(model.run_with_hooks(ids), model.forward(ids))
    assert not np.allclose(model.forward(ids), logits)
    handle.remove()
    model.add_hook(lambda name: name.endswith("hook_z"), lambda act, hook: act * 0)
    model.reset_hooks()
    assert np.array_equal(model.forward(ids), logits)
    with pytest.raises(KeyError, match="no hook point named"):
        model.add_hook("blocks.30.hook_resid_pre", lambda act, hook: act)  # SmolLM2 has layers 0..29


def test_stop_at_layer_returns_the_residual_and_runs_no_further(model, run):
    ids, _, full = run
    resid, cache = model.run_with_cache(ids, stop_at_layer=3)
    assert np.array_equal(resid, full["resid_post", 2])
    assert "blocks.2.hook_resid_post" in cache and not any(name.startswith("blocks.3.") for name in cache)
    assert "hook_logits" not in cache


def test_hooks_fire_during_generation_with_decode_shapes(model):
    ids = model.tokenize(PROMPT)
    seen: list[tuple[str, tuple]] = []
    names = ("blocks.0.hook_resid_pre", "blocks.4.attn.hook_pattern")
    gen = model.start(ids, max_new_tokens=3, temperature=0)
    with model.hooks([(name, lambda act, hook: seen.append((hook.name, act.shape))) for name in names]):
        gen.prefill()
        gen.step()
        gen.step()
    gen.close()
    t, d, h = len(ids), model.cfg.d_model, model.cfg.n_heads
    assert seen == [(names[0], (t, d)), (names[1], (h, t, t)),               # prefill: the whole prompt
                    (names[0], (1, d)), (names[1], (h, 1, t + 1))]           # first decode: one query, t+1 keys


def test_decode_pattern_row_equals_the_full_forwards_last_row(model):
    gen = model.start(PROMPT, max_new_tokens=2, temperature=0)
    gen.prefill()
    step_patterns: dict[str, np.ndarray] = {}
    with model.hooks([("blocks.7.attn.hook_pattern", caching_hook(step_patterns))]):
        gen.step()  # samples token 1 and ...
        gen.step()  # ... runs its forward: one query over the cached keys
    tokens = list(gen.state.tokens[:-1])
    gen.close()
    _, cache = model.run_with_cache(tokens, names_filter="blocks.7.attn.hook_pattern")
    decoded, full = step_patterns["blocks.7.attn.hook_pattern"][:, 0], cache["pattern", 7][:, -1]
    # Not bit-equal: a 1-row and a 6-row matmul round differently, and llama.cpp-style 8-bit activation
    # rounding amplifies that (seen: up to 0.003). A wrong mask or key offset would move whole rows.
    np.testing.assert_allclose(decoded, full, rtol=0, atol=1e-2)
    assert np.array_equal(decoded.argmax(-1), full.argmax(-1))


def test_step_layer_by_layer_equals_a_full_step_and_state_shows_the_residual(model):
    runs = {}
    for mode in ("step", "layers"):
        gen = model.start(PROMPT, max_new_tokens=2, temperature=0)
        gen.prefill()
        store: dict[str, np.ndarray] = {}
        with model.hooks([(lambda n: n.endswith("hook_resid_post"), caching_hook(store))]):
            if mode == "step":
                gen.step()
                gen.step()
            else:
                gen.step()
                states = []
                while True:
                    layer = gen.step_layer()
                    states.append(gen.state)
                    if layer == model.cfg.n_layers - 1:
                        break
                gen.step()  # samples from the logits the last layer produced
        runs[mode] = (gen.state.tokens, gen.state.kv_length, dict(store))
        gen.close()
    assert runs["step"][0] == runs["layers"][0] and runs["step"][1] == runs["layers"][1]
    for name, act in runs["step"][2].items():
        assert np.array_equal(act, runs["layers"][2][name]), name
    n_prompt = len(model.tokenize(PROMPT))
    for i, state in enumerate(states[:-1]):
        assert state.layer == i + 1 and state.position == n_prompt and len(state.tokens) == n_prompt + 1
        assert state.kv_length == n_prompt + 1
        assert np.array_equal(state.resid, runs["layers"][2][f"blocks.{i}.hook_resid_post"])
    assert states[-1].layer is None and states[-1].logits is not None


@pytest.mark.slow
def test_gemma3_sliding_layers_attend_within_the_window(gemma3_path):
    import rocmforge
    model = rocmforge.load(gemma3_path, device="cpu", n_ctx=1024)
    window = model.cfg.sliding_window
    assert model.cfg.is_sliding(0) and not model.cfg.is_sliding(5)
    ids = [int(t) for t in np.random.default_rng(0).integers(1000, 20000, size=window + 8)]
    _, cache = model.run_with_cache(ids, names_filter="blocks.0.attn.hook_pattern", stop_at_layer=1)
    pattern = cache["pattern", 0]
    q, k = np.arange(len(ids))[:, None], np.arange(len(ids))[None]
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)
    assert np.all(pattern[:, (k > q) | (q - k >= window)] == 0)  # future and beyond-window keys get nothing
    assert np.all(pattern[:, -1, len(ids) - window:] > 0)      # the last query sees its whole window
