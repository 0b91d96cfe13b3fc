"""The hook registry and ActivationCache, first on a tiny numpy transformer, then on SmolLM2."""
from __future__ import annotations

import numpy as np
import pytest

from rocmforge.hooks import ActivationCache, HookPoint, Hooks, act_name, caching_hook, hook_names, hook_shape

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
