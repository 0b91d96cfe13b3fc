"""Hook points inside the forward pass, named as TransformerLens names them.

Every architecture's forward passes each intermediate through ``hooks(name, x)``. With nothing
registered that call is one attribute check (``hooks.active``) and returns ``x`` untouched, so the
forward runs at full speed. A registered hook is ``fn(act, hook) -> None | array``: it sees the
activation as a host numpy array, and an array it returns replaces the activation downstream.
Return the replacement rather than editing ``act`` in place: on a GPU backend ``act`` is a host copy.

>>> import numpy as np
>>> hooks = Hooks()
>>> hooks("blocks.0.hook_resid_pre", np.ones(3))            # nothing registered: x comes back
array([1., 1., 1.])
>>> handle = hooks.add("blocks.0.hook_resid_pre", lambda act, hook: act * 2)
>>> hooks("blocks.0.hook_resid_pre", np.ones(3))
array([2., 2., 2.])
>>> handle.remove(); hooks.active
False
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, Union

import numpy as np

# Every hook point, with the shape of the activation a hook receives. ``pos`` is the number of
# tokens in this forward call (the whole prompt in prefill, 1 in a decode step); ``key_pos`` is
# the number of cached keys the queries attend to (prompt length in prefill, KV length in decode).
HOOK_SHAPES: dict[str, str] = {
    "hook_embed": "[pos, d_model]",
    "blocks.{i}.hook_resid_pre": "[pos, d_model]",
    "blocks.{i}.ln1.hook_normalized": "[pos, d_model]",
    "blocks.{i}.attn.hook_q": "[pos, head, d_head]",
    "blocks.{i}.attn.hook_k": "[pos, kv_head, d_head]",
    "blocks.{i}.attn.hook_v": "[pos, kv_head, d_head_v]",
    "blocks.{i}.attn.hook_rot_q": "[pos, head, d_head]",
    "blocks.{i}.attn.hook_rot_k": "[pos, kv_head, d_head]",
    "blocks.{i}.attn.hook_attn_scores": "[head, pos, key_pos]",
    "blocks.{i}.attn.hook_pattern": "[head, pos, key_pos]",
    "blocks.{i}.attn.hook_z": "[pos, head, d_head_v]",
    "blocks.{i}.hook_attn_out": "[pos, d_model]",
    "blocks.{i}.hook_resid_mid": "[pos, d_model]",
    "blocks.{i}.ln2.hook_normalized": "[pos, d_model]",
    "blocks.{i}.mlp.hook_pre": "[pos, d_mlp]",
    "blocks.{i}.mlp.hook_post": "[pos, d_mlp]",
    "blocks.{i}.hook_mlp_out": "[pos, d_model]",
    "blocks.{i}.hook_resid_post": "[pos, d_model]",
    "ln_final.hook_normalized": "[pos, d_model]",
    "hook_logits": "[pos, d_vocab]",
}

# Short names, as TransformerLens' ``utils.get_act_name`` accepts them, -> full name template.
_SHORT_NAMES: dict[str, str] = {
    "embed": "hook_embed",
    "logits": "hook_logits",
    "ln_final": "ln_final.hook_normalized",
    **{n: f"blocks.{{i}}.hook_{n}" for n in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")},
    **{n: f"blocks.{{i}}.attn.hook_{n}" for n in ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z")},
    "attn": "blocks.{i}.attn.hook_pattern",
    "scores": "blocks.{i}.attn.hook_attn_scores",
    "pre": "blocks.{i}.mlp.hook_pre",
    "post": "blocks.{i}.mlp.hook_post",
}

_LAYER_OF = re.compile(r"^blocks\.(\d+)\.")


def hook_names(n_layers: int) -> list[str]:
    """Every hook point of an ``n_layers`` model, in the order the forward reaches them.

    >>> hook_names(2)[:3]
    ['hook_embed', 'blocks.0.hook_resid_pre', 'blocks.0.ln1.hook_normalized']
    >>> len(hook_names(2)) == 3 + 2 * 17  # embed, logits, final norm + 17 per layer
    True
    """
    per_layer = [t for t in HOOK_SHAPES if t.startswith("blocks.")]
    names = ["hook_embed"]
    for i in range(n_layers):
        names.extend(t.replace("{i}", str(i)) for t in per_layer)
    return names + ["ln_final.hook_normalized", "hook_logits"]


def hook_shape(name: str) -> str:
    """The documented shape of hook point ``name``.

    >>> hook_shape("blocks.7.attn.hook_pattern")
    '[head, pos, key_pos]'
    """
    return HOOK_SHAPES[_LAYER_OF.sub("blocks.{i}.", name)]


def act_name(name: str, layer: int | None = None, layer_type: str | None = None, n_layers: int | None = None) -> str:
    """A short name plus a layer -> the full hook name (TransformerLens' ``get_act_name``).

    Negative layers count from the end when ``n_layers`` is given; ``normalized`` needs
    ``layer_type`` ``"ln1"`` or ``"ln2"``.

    >>> act_name("pattern", 3)
    'blocks.3.attn.hook_pattern'
    >>> act_name("normalized", 0, "ln2")
    'blocks.0.ln2.hook_normalized'
    >>> act_name("resid_post", -1, n_layers=30)
    'blocks.29.hook_resid_post'
    """
    if layer is not None and layer < 0:
        if n_layers is None:
            raise KeyError(f"negative layer {layer} needs the number of layers")
        layer += n_layers
    if name == "normalized":
        if layer_type not in ("ln1", "ln2"):
            raise KeyError("'normalized' needs layer_type 'ln1' or 'ln2' (or use 'ln_final')")
        template = f"blocks.{{i}}.{layer_type}.hook_normalized"
    elif name in _SHORT_NAMES:
        template = _SHORT_NAMES[name]
    else:
        raise KeyError(f"unknown activation {name!r}; short names: {', '.join(sorted(_SHORT_NAMES))}, normalized")
    if "{i}" in template:
        if layer is None:
            raise KeyError(f"{name!r} is per layer: give a layer, e.g. cache[{name!r}, 0]")
        return template.replace("{i}", str(layer))
    return template


@dataclass(frozen=True)
class HookPoint:
    """What a hook function receives as its second argument: which point fired."""
    name: str

    @property
    def layer(self) -> int | None:
        match = _LAYER_OF.match(self.name)
        return int(match.group(1)) if match else None


HookFn = Callable[[np.ndarray, HookPoint], Union[np.ndarray, None]]
NameOrFilter = Union[str, Callable[[str], bool]]


class HostTransfer(Protocol):
    """The two backend methods hooks need: device arrays cross to the host only when hooked."""
    def to_host(self, x: Any) -> np.ndarray: ...
    def from_host(self, a: np.ndarray) -> Any: ...


@dataclass(eq=False)
class HookHandle:
    """A registered hook; ``remove()`` takes it out again (removing twice is harmless)."""
    match: NameOrFilter
    fn: HookFn
    registry: "Hooks"

    def matches(self, name: str) -> bool:
        return self.match == name if isinstance(self.match, str) else bool(self.match(name))

    def remove(self) -> None:
        self.registry._remove(self)


class Hooks:
    """The registry a forward calls at every hook point: ``hooks(name, x) -> x``.

    ``backend`` (optional) moves a hooked activation to the host and a replacement back; on the
    CPU backend activations already are numpy arrays. ``valid_names`` (optional) lets ``add``
    reject a misspelt hook name instead of silently never firing.
    """

    def __init__(self, backend: HostTransfer | None = None, valid_names: Iterable[str] | None = None) -> None:
        self.backend = backend
        self.valid_names = frozenset(valid_names) if valid_names is not None else None
        self.active = False  # the forward's fast path: skip building attention scores/pattern copies
        self._handles: list[HookHandle] = []
        self._resolved: dict[str, tuple[HookHandle, ...]] = {}  # name -> matching hooks, rebuilt on change
        self._points: dict[str, HookPoint] = {}

    def __call__(self, name: str, x: Any) -> Any:
        if not self.active:
            return x
        handles = self._matching(name)
        if not handles:
            return x
        point = self._points.get(name) or self._points.setdefault(name, HookPoint(name))
        act = self.backend.to_host(x) if self.backend is not None else x
        replaced = False
        for handle in handles:
            out = handle.fn(act, point)
            if out is not None:
                out = np.asarray(out, dtype=act.dtype)
                if out.shape != act.shape:
                    raise ValueError(f"hook on {name} returned shape {out.shape}, expected {act.shape}")
                act, replaced = out, True
        if not replaced:
            return x
        return self.backend.from_host(act) if self.backend is not None else act

    def wants(self, name: str) -> bool:
        """Whether a hook would fire at ``name`` (lets a forward skip building an activation)."""
        return self.active and bool(self._matching(name))

    def _matching(self, name: str) -> tuple[HookHandle, ...]:
        handles = self._resolved.get(name)
        if handles is None:  # filters run once per name until the set of hooks changes
            handles = self._resolved[name] = tuple(h for h in self._handles if h.matches(name))
        return handles

    def add(self, name_or_filter: NameOrFilter, fn: HookFn) -> HookHandle:
        """Register ``fn`` at one hook name, or at every name for which a filter returns True."""
        if isinstance(name_or_filter, str) and self.valid_names is not None and name_or_filter not in self.valid_names:
            raise KeyError(f"no hook point named {name_or_filter!r}; model.hook_names() lists them")
        if not (isinstance(name_or_filter, str) or callable(name_or_filter)):
            raise TypeError(f"hook target must be a name or a filter callable, not {type(name_or_filter).__name__}")
        handle = HookHandle(name_or_filter, fn, self)
        self._handles.append(handle)
        self._changed()
        return handle

    def _remove(self, handle: HookHandle) -> None:
        if handle in self._handles:
            self._handles.remove(handle)
            self._changed()

    def reset(self) -> None:
        """Remove every hook."""
        self._handles.clear()
        self._changed()

    def _changed(self) -> None:
        self._resolved.clear()
        self.active = bool(self._handles)

    def __len__(self) -> int:
        return len(self._handles)

    @contextmanager
    def temporary(self, fwd_hooks: Iterable[tuple[NameOrFilter, HookFn]]) -> Iterator["Hooks"]:
        """Hooks that live for one ``with`` block and are removed even when a hook raises."""
        added: list[HookHandle] = []
        try:
            for target, fn in fwd_hooks:
                added.append(self.add(target, fn))
            yield self
        finally:
            for handle in added:
                handle.remove()


def caching_hook(store: dict[str, np.ndarray]) -> HookFn:
    """A hook that copies each activation it sees into ``store`` under its hook name.

    A copy, because the forward may update buffers such as the residual stream in place.
    In a stepwise generation the same name fires once per step; later steps overwrite earlier ones.
    """
    def cache(act: np.ndarray, hook: HookPoint) -> None:
        store[hook.name] = np.array(act, copy=True)
    return cache


class ActivationCache(Mapping[str, np.ndarray]):
    """Activations of one run by hook name, indexable the TransformerLens way.

    ``unembed`` maps a residual stream ``[..., d_model]`` through the final norm and the
    unembedding to logits (for ``logit_lens``), without firing hooks.

    >>> import numpy as np
    >>> cache = ActivationCache({"blocks.0.attn.hook_pattern": np.eye(2)[None]}, n_layers=1)
    >>> cache["pattern", 0].shape, cache["blocks.0.attn.hook_pattern"].shape
    ((1, 2, 2), (1, 2, 2))
    """

    def __init__(self, activations: dict[str, np.ndarray], n_layers: int,
                 unembed: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self._acts = activations
        self.n_layers = n_layers
        self._unembed = unembed

    def __getitem__(self, key: str | tuple) -> np.ndarray:
        if isinstance(key, tuple):
            key = act_name(*key, n_layers=self.n_layers)  # type: ignore[misc]
        elif key not in self._acts and key in ("embed", "logits", "ln_final"):
            key = act_name(key)
        try:
            return self._acts[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in this cache (cached: {len(self._acts)} names; "
                           "was it filtered out by names_filter or past stop_at_layer?)") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations, n_layers={self.n_layers})"

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False) -> np.ndarray:
        """The residual stream as it grows: ``[component, pos, d_model]``.

        Component ``i`` is the input to layer ``i`` (``resid_pre``; with ``incl_mid`` also each
        ``resid_mid`` after it); the last is the final ``resid_post`` when ``layer`` is None.
        Stops before layer ``layer`` otherwise.
        """
        stop = self.n_layers if layer is None else layer
        parts: list[np.ndarray] = []
        for i in range(stop):
            parts.append(self[f"blocks.{i}.hook_resid_pre"])
            if incl_mid:
                parts.append(self[f"blocks.{i}.hook_resid_mid"])
        if layer is None or layer >= self.n_layers:
            parts.append(self[f"blocks.{self.n_layers - 1}.hook_resid_post"])
        return np.stack(parts)

    def logit_lens(self, pos: int | slice | None = None) -> np.ndarray:
        """Each layer's residual read out as logits: ``[n_layers + 1, pos, d_vocab]``.

        Row ``i < n_layers`` decodes the input to layer ``i``; the last row decodes the final
        residual and equals the model's logits. ``pos`` picks positions first (the logits of
        every position of every layer are large: 31 x 49,152 floats per token on SmolLM2).
        """
        if self._unembed is None:
            raise ValueError("this cache has no unembedding; make it with model.run_with_cache")
        resid = self.accumulated_resid()
        if pos is not None:
            resid = resid[:, pos]
        # one layer at a time: the same matrix shapes as the forward's own unembedding, so the same bits
        return np.stack([self._unembed(component) for component in resid])


NamesFilter = Union[None, str, Iterable[str], Callable[[str], bool]]


def _as_filter(names_filter: NamesFilter) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    wanted = frozenset(names_filter)
    return lambda name: name in wanted


class HookedModel:
    """The hook API of ``rocmforge.model.Model`` (mixed into it), as TransformerLens' ``HookedTransformer`` has it.

    Expects ``hook_registry`` (the ``Hooks`` the forward context calls), ``cfg``, ``arch``, ``ctx``, ``kv``,
    ``ops`` and ``forward(ids)``. Hooks fire in every forward: ``forward``, ``run_with_*`` and generation
    (``prefill``, ``step``, ``step_layer``).

    >>> import rocmforge  # doctest: +SKIP
    >>> model = rocmforge.load("smollm2-135m")  # doctest: +SKIP
    >>> logits, cache = model.run_with_cache(model.tokenize("Hello world"))  # doctest: +SKIP
    >>> cache["pattern", 0].shape  # [head, query_pos, key_pos]  # doctest: +SKIP
    (9, 3, 3)
    >>> with model.hooks([("blocks.0.hook_attn_out", lambda act, hook: act * 0)]):  # doctest: +SKIP
    ...     ablated = model.forward(model.tokenize("Hello world"))
    """

    hook_registry: Hooks

    def hook_names(self) -> list[str]:
        """Every hook point in forward order; ``rocmforge.hooks.hook_shape(name)`` gives its shape."""
        return hook_names(self.cfg.n_layers)

    def add_hook(self, name_or_filter: NameOrFilter, fn: HookFn) -> HookHandle:
        """Register a hook that stays until ``handle.remove()`` or ``reset_hooks()``."""
        return self.hook_registry.add(name_or_filter, fn)

    def reset_hooks(self) -> None:
        """Remove every hook, temporary or not."""
        self.hook_registry.reset()

    def hooks(self, fwd_hooks: Iterable[tuple[NameOrFilter, HookFn]]) -> "contextlib.AbstractContextManager[Hooks]":
        """``with model.hooks([(name_or_filter, fn), ...]):`` hooks removed on leaving, even on an exception."""
        return self.hook_registry.temporary(fwd_hooks)

    def run_with_hooks(self, ids: Sequence[int], fwd_hooks: Iterable[tuple[NameOrFilter, HookFn]] = ()) -> np.ndarray:
        """Logits ``[pos, d_vocab]`` of ``ids`` with ``fwd_hooks`` in place for this one run."""
        with self.hooks(fwd_hooks):
            return self.forward(ids)

    def run_with_cache(self, ids: Sequence[int], names_filter: NamesFilter = None,
                       stop_at_layer: int | None = None) -> tuple[np.ndarray, ActivationCache]:
        """Run ``ids`` and keep every activation whose name passes ``names_filter`` (a name, names or callable).

        Returns ``(logits [pos, d_vocab], cache)``; with ``stop_at_layer=n`` only blocks ``0..n-1`` run
        (negative counts from the end) and the first item is the residual stream ``[pos, d_model]`` after them.
        """
        store: dict[str, np.ndarray] = {}
        with self.hooks([(_as_filter(names_filter), caching_hook(store))]):
            if stop_at_layer is None:
                out = self.forward(ids)
            else:
                stop = stop_at_layer % self.cfg.n_layers if stop_at_layer < 0 else stop_at_layer
                out = self._run([ids], 0, None, stop_at_layer=stop)[0]
        return out, ActivationCache(store, self.cfg.n_layers, self.unembed_quietly)

    def forward_many(self, prompts: Sequence[Sequence[int]], start_at_layer: int = 0,
                     resid: np.ndarray | None = None) -> list[np.ndarray]:
        """Logits ``[pos, d_vocab]`` of several prompts run as ONE batched forward (one sequence each).

        Hooks see the batch as one flat ``[sum of pos, ...]`` array, prompt after prompt, except the
        attention scores and pattern, which fire once per prompt. With ``start_at_layer=n`` the blocks
        before ``n`` are skipped and ``resid`` (``[sum of pos, d_model]``, the input of block ``n``) is used
        instead: each layer's attention reads only its own layer's keys and values, so nothing is lost.
        """
        logits, rows = self._run(prompts, start_at_layer, resid, stop_at_layer=None)
        return [logits[r] for r in rows]

    def _run(self, prompts: Sequence[Sequence[int]], start_at_layer: int, resid: np.ndarray | None,
             stop_at_layer: int | None) -> tuple[np.ndarray, list[slice]]:
        """Blocks ``start_at_layer..stop_at_layer-1`` on fresh sequences, then (only without a stop) the
        unembedding; returns the host result and each prompt's rows in it."""
        stop = self.cfg.n_layers if stop_at_layer is None else min(stop_at_layer, self.cfg.n_layers)
        seqs = [self.kv.new_sequence() for _ in prompts]
        try:
            batch = self.kv.prepare([(seq, list(ids)) for seq, ids in zip(seqs, prompts)])
            x = self.arch.embed(self.ctx, batch.tokens) if start_at_layer == 0 else self.ops.from_host(resid)
            for layer in range(start_at_layer, stop):
                x = self.arch.block(self.ctx, layer, x, batch)
            out = self.arch.unembed(self.ctx, x) if stop_at_layer is None else x
            return self.ops.to_host(out), [seg.rows for seg in batch.segments]
        finally:
            for seq in seqs:
                self.kv.free(seq)

    def unembed_quietly(self, resid: np.ndarray) -> np.ndarray:
        """Residual stream ``[..., d_model]`` -> logits ``[..., d_vocab]`` through the final norm, firing no hooks."""
        resid = np.asarray(resid, np.float32)
        ctx = dataclasses.replace(self.ctx, hooks=Hooks())
        logits = self.ops.to_host(self.arch.unembed(ctx, self.ops.from_host(resid.reshape(-1, resid.shape[-1]))))
        return logits.reshape(resid.shape[:-1] + (logits.shape[-1],))
