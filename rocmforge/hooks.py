"""Hook points inside the forward pass, named as TransformerLens names them.

Every architecture's forward passes each intermediate through ``hooks(name, x)``. With nothing
registered that call is one attribute check (``hooks.active``) and returns ``x`` untouched, so the
forward runs at full speed. A registered hook is ``fn(act, hook) -> None | array``, and an array it
returns replaces the activation downstream. Two kinds:
- a host hook (the default) sees ``act`` as a numpy array: on a GPU backend a host copy;
- a device hook (``add(name, fn, on_device=True)``, or ``fn.on_device = True`` as the built-in edits in
  ``rocmforge.edits`` have) sees the backend's own array (a DLPack ``DeviceArray`` on a GPU, numpy on the
  CPU) and may return any DLPack array (torch, CuPy, JAX), used on the device without a copy.
Return the replacement rather than editing ``act`` in place: others (a cache) may hold it.

What a hook costs on a GPU: with any hook registered, a step runs eagerly, op by op from Python (no replayed
decode graph, no batched decode graph, no sampling on the device; ``rocmforge.engine.step_all`` takes the logits
to the host). That is ~150-270 kernel launches per token at ~4 µs each from Python instead of ~1 µs inside a
graph (``shared/notes/measured-here.md``), plus a device-to-host copy per activation a host hook sees (device
hooks need none): a decode step of several ms instead of ~1 ms, and a batch of many sequences loses the
one-graph-per-tick speed-up entirely.

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

import re
from collections.abc import Callable, Iterable, Iterator
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
    """What a hook function receives as its second argument: which point fired (and the backend it runs on)."""
    name: str
    ops: Any = None

    @property
    def layer(self) -> int | None:
        match = _LAYER_OF.match(self.name)
        return int(match.group(1)) if match else None


HookFn = Callable[[np.ndarray, HookPoint], Union[np.ndarray, None]]
NameOrFilter = Union[str, Callable[[str], bool]]


class HostTransfer(Protocol):
    """The backend methods hooks need: device arrays cross to the host only for host hooks."""
    def to_host(self, x: Any) -> np.ndarray: ...
    def from_host(self, a: np.ndarray) -> Any: ...


@dataclass(eq=False)
class HookHandle:
    """A registered hook; ``remove()`` takes it out again (removing twice is harmless)."""
    match: NameOrFilter
    fn: HookFn
    registry: "Hooks"
    on_device: bool = False

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
        point = self._points.get(name) or self._points.setdefault(name, HookPoint(name, self.backend))
        device, host, replaced = x, None, False  # the activation on each side, made when a hook needs it
        for handle in handles:
            if handle.on_device:
                if device is None:
                    device = self._up(host)
                if getattr(handle.fn, "reads_values", True) and self.backend is not None:
                    self.backend.flush()  # launch work held back for fusion before a user's code reads x
                out = handle.fn(device, point)
                if out is not None:
                    device, host, replaced = self._device_result(out, device.shape), None, True
            else:
                if host is None:
                    host = self.backend.to_host(device) if self.backend is not None else device
                out = handle.fn(host, point)
                if out is not None:
                    out = np.asarray(out, dtype=host.dtype)
                    if out.shape != host.shape:
                        raise ValueError(f"hook on {name} returned shape {out.shape}, expected {host.shape}")
                    host, device, replaced = out, None, True
        if not replaced:
            return x
        return device if device is not None else self._up(host)

    def _up(self, host: np.ndarray) -> Any:
        return self.backend.from_host(host) if self.backend is not None else host

    def _device_result(self, out: Any, shape: tuple[int, ...]) -> Any:
        if self.backend is not None and hasattr(self.backend, "as_array"):
            return self.backend.as_array(out, shape)
        out = np.asarray(np.from_dlpack(out) if hasattr(out, "__dlpack__") else out, dtype=np.float32)
        if out.shape != tuple(shape):
            raise ValueError(f"a hook returned shape {out.shape}, expected {tuple(shape)}")
        return out

    def wants(self, name: str) -> bool:
        """Whether a hook would fire at ``name`` (lets a forward skip building an activation)."""
        return self.active and bool(self._matching(name))

    def _matching(self, name: str) -> tuple[HookHandle, ...]:
        handles = self._resolved.get(name)
        if handles is None:  # filters run once per name until the set of hooks changes
            handles = self._resolved[name] = tuple(h for h in self._handles if h.matches(name))
        return handles

    def add(self, name_or_filter: NameOrFilter, fn: HookFn, on_device: bool | None = None) -> HookHandle:
        """Register ``fn`` at one hook name, or at every name for which a filter returns True.

        ``on_device`` (default: ``fn.on_device`` if set, else False) makes it a device hook (module docstring)."""
        if isinstance(name_or_filter, str) and self.valid_names is not None and name_or_filter not in self.valid_names:
            raise KeyError(f"no hook point named {name_or_filter!r}; model.hook_names() lists them")
        if not (isinstance(name_or_filter, str) or callable(name_or_filter)):
            raise TypeError(f"hook target must be a name or a filter callable, not {type(name_or_filter).__name__}")
        if on_device is None:
            on_device = bool(getattr(fn, "on_device", False))
        handle = HookHandle(name_or_filter, fn, self, on_device)
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


def device_caching_hook(store: dict[str, list[Any]], backend: Any) -> HookFn:
    """A device hook that keeps ``backend.snapshot(act)`` of every firing, in order, under its name.

    On a GPU the snapshot is the array itself (no copy, nothing leaves the device); on the CPU a copy. A list
    per name, because in a batched forward the attention scores and pattern fire once per prompt.
    """
    def cache(act: Any, hook: HookPoint) -> None:
        store.setdefault(hook.name, []).append(backend.snapshot(act))
    cache.on_device = True          # type: ignore[attr-defined]
    cache.reads_values = False      # type: ignore[attr-defined]  (a reference needs no flushed values)
    return cache
