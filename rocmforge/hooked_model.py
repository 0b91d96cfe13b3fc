"""The hook API of ``rocmforge.model.Model``, as TransformerLens' ``HookedTransformer`` has it: ``run_with_cache``,
``run_with_hooks``, ``hooks()``, ``add_hook``, for one prompt or many prompts of different lengths in ONE forward.

Many prompts: pass a list of token lists. They run as one batched forward (each prompt its own sequence in the
KV cache, attention per prompt), and each prompt's activations equal its solo run: bit for bit on the CPU
backends (every matrix product runs per prompt there, with exactly the rows of the solo run, since BLAS rounds by
call shape), within float tolerance on a GPU (its kernels tile by row count). Results are padded on the right
to ``[batch, pos, ...]`` with ``cache.mask``, or per prompt with ``cache.prompt(i)`` / ``padded=False``.

>>> import rocmforge  # doctest: +SKIP
>>> model = rocmforge.load("smollm2-135m")  # doctest: +SKIP
>>> logits, cache = model.run_with_cache(model.tokenize("Hello world"))  # doctest: +SKIP
>>> cache["pattern", 0].shape  # [head, query_pos, key_pos]  # doctest: +SKIP
(9, 3, 3)
>>> logits, cache = model.run_with_cache([model.tokenize("Hi"), model.tokenize("Hello world")])  # doctest: +SKIP
>>> logits.shape, cache["resid_post", 3].shape, cache.mask.sum(1).tolist()  # doctest: +SKIP
((2, 3, 49152), (2, 3, 576), [2, 3])
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import numpy as np

from rocmforge.activation_cache import ActivationCache
from rocmforge.hooks import HookFn, HookHandle, Hooks, NameOrFilter, device_caching_hook, hook_names

NamesFilter = Union[None, str, Iterable[str], Callable[[str], bool]]
Prompts = Union[Sequence[int], Sequence[Sequence[int]]]


def as_filter(names_filter: NamesFilter) -> Callable[[str], bool]:
    """A name predicate from None (every name), one name, several names, or a predicate."""
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    wanted = frozenset(names_filter)
    return lambda name: name in wanted


def is_batch(ids_or_prompts: Prompts) -> bool:
    """True for a list of prompts (token lists), False for one prompt's tokens."""
    return len(ids_or_prompts) > 0 and not np.isscalar(ids_or_prompts[0]) and hasattr(ids_or_prompts[0], "__len__")


class _PerPromptProducts:
    """A CPU backend whose matrix products run one prompt at a time (every other op is row by row already), so
    a batched forward gives each prompt the bits of its solo run. Everything else is the backend's own."""

    def __init__(self, ops: Any, rows: list[slice]) -> None:
        self._ops, self._rows, self._n = ops, rows, rows[-1].stop
        self._split: tuple[Any, list[np.ndarray]] | None = None  # the last input and its per-prompt copies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ops, name)

    def matmul(self, x: np.ndarray, weight: Any) -> np.ndarray:
        if x.shape[0] != self._n:
            return self._ops.matmul(x, weight)
        if self._split is None or self._split[0] is not x:  # the same objects again for q/k/v and gate/up, so
            self._split = (x, [np.ascontiguousarray(x[rows]) for rows in self._rows])  # the backend's caches hit
        return np.concatenate([self._ops.matmul(part, weight) for part in self._split[1]])


class HookedModel:
    """Mixed into ``Model``. Expects ``hook_registry``, ``cfg``, ``arch``, ``ctx``, ``kv``, ``ops``, ``forward(ids)``.

    Hooks fire in every forward: ``forward``, ``run_with_*`` and generation (``prefill``, ``step``, ``step_layer``).

    >>> import rocmforge  # doctest: +SKIP
    >>> model = rocmforge.load("smollm2-135m")  # doctest: +SKIP
    >>> with model.hooks([("blocks.0.hook_attn_out", lambda act, hook: act * 0)]):  # doctest: +SKIP
    ...     ablated = model.forward(model.tokenize("Hello world"))
    """

    hook_registry: Hooks

    def hook_names(self) -> list[str]:
        """Every hook point in forward order; ``rocmforge.hooks.hook_shape(name)`` gives its shape."""
        return hook_names(self.cfg.n_layers)

    def add_hook(self, name_or_filter: NameOrFilter, fn: HookFn, on_device: bool | None = None) -> HookHandle:
        """Register a hook that stays until ``handle.remove()`` or ``reset_hooks()`` (``on_device``: see hooks)."""
        return self.hook_registry.add(name_or_filter, fn, on_device)

    def reset_hooks(self) -> None:
        """Remove every hook, temporary or not."""
        self.hook_registry.reset()

    def hooks(self, fwd_hooks: Iterable[tuple[NameOrFilter, HookFn]]) -> "contextlib.AbstractContextManager[Hooks]":
        """``with model.hooks([(name_or_filter, fn), ...]):`` hooks removed on leaving, even on an exception."""
        return self.hook_registry.temporary(fwd_hooks)

    def run_with_hooks(self, ids_or_prompts: Prompts, fwd_hooks: Iterable[tuple[NameOrFilter, HookFn]] = (),
                       padded: bool = True) -> Any:
        """Host logits with ``fwd_hooks`` in place for this one run: ``[pos, d_vocab]`` for one prompt; for a list
        of prompts (one batched forward) ``[batch, pos, d_vocab]`` padded on the right, or a list with ``padded=False``."""
        with self.hooks(fwd_hooks):
            if not is_batch(ids_or_prompts):
                return self.forward(ids_or_prompts)
            out, rows = self.run_batch(ids_or_prompts)
            logits = self.ops.to_host(out)
        parts = [logits[r] for r in rows]
        return _pad_host(parts) if padded else parts

    def run_with_cache(self, ids_or_prompts: Prompts, names_filter: NamesFilter = None,
                       stop_at_layer: int | None = None, device: str | None = None) -> tuple[Any, ActivationCache]:
        """Run and keep every activation whose name passes ``names_filter`` (a name, names or a predicate).

        Returns ``(logits, cache)``: logits ``[pos, d_vocab]`` (``[batch, pos, d_vocab]`` padded for a list of
        prompts). With ``stop_at_layer=n`` only blocks ``0..n-1`` run (negative counts from the end) and the first
        item is the residual stream after them. Logits and cache stay where the backend computes them (on a GPU,
        DLPack ``DeviceArray``\\ s: nothing is copied to the host) unless ``device="cpu"`` asks for host copies.
        """
        if device not in (None, "cpu", self.ops.name):
            raise ValueError(f"device={device!r}: this model runs on {self.ops.name!r}; give None or 'cpu'")
        batched = is_batch(ids_or_prompts)
        prompts = list(ids_or_prompts) if batched else [ids_or_prompts]
        stop = None if stop_at_layer is None else (
            stop_at_layer % self.cfg.n_layers if stop_at_layer < 0 else stop_at_layer)
        store: dict[str, list[Any]] = {}
        with self.hooks([(as_filter(names_filter), device_caching_hook(store, self.ops))]):
            out, rows = self.run_batch(prompts, stop_at_layer=stop)
        acts = {name: (fired if name.endswith(("hook_attn_scores", "hook_pattern")) and batched else fired[-1])
                for name, fired in store.items()}
        cache = ActivationCache(acts, self.cfg.n_layers, self.unembed_quietly, ops=self.ops,
                                prompt_rows=rows if batched else None)
        if batched:
            out = ActivationCache({"out": out}, self.cfg.n_layers, ops=self.ops, prompt_rows=rows)["out"]
        if device == "cpu":
            return np.asarray(out), cache.to_host()
        return out, cache

    def run_batch(self, prompts: Sequence[Sequence[int]], start_at_layer: int = 0, resid: Any = None,
                  stop_at_layer: int | None = None, prefixes: Sequence[int] | None = None,
                  prefix_kv: Callable[[int, Any], tuple[Any, Any]] | None = None,
                  logit_rows: np.ndarray | None = None, solo_bits: bool = True) -> tuple[Any, list[slice]]:
        """Blocks ``start_at_layer..stop_at_layer-1`` over fresh sequences, then (without a stop) the unembedding.

        Returns the backend's array (logits, or the residual after the last block run) and each prompt's rows.
        ``prefixes[i]`` tokens of prompt ``i`` are already known: their keys and values per layer come from
        ``prefix_kv(layer, prefix_batch) -> (k, v)`` and only the rest of the prompt runs (what a patching sweep
        needs: positions before a patch are the unpatched run's). ``logit_rows`` unembeds only those rows.
        ``solo_bits=False`` lets a CPU backend multiply the whole batch at once (faster; a prompt's bits then
        depend on the batch around it).
        """
        stop = self.cfg.n_layers if stop_at_layer is None else min(stop_at_layer, self.cfg.n_layers)
        seqs = [self.kv.new_sequence() for _ in prompts]
        try:
            if prefixes is not None and any(prefixes):
                known = self.kv.prepare([(s, ids[:p]) for s, ids, p in zip(seqs, prompts, prefixes) if p])
                for layer in range(start_at_layer, stop):
                    k, v = prefix_kv(layer, known)
                    self.ops.kv_write(self.kv, layer, known, k, v)
                prompts = [ids[p:] for ids, p in zip(prompts, prefixes or [0] * len(prompts))]
            batch = self.kv.prepare([(seq, list(ids)) for seq, ids in zip(seqs, prompts)])
            rows = [seg.rows for seg in batch.segments]
            ctx = self.ctx
            if solo_bits and len(rows) > 1 and self.ops.name in ("cpu", "cpu-exact"):
                ctx = dataclasses.replace(ctx, ops=_PerPromptProducts(self.ops, rows))
            x = self.arch.embed(ctx, batch.tokens) if start_at_layer == 0 else (
                self.ops.from_host(resid) if isinstance(resid, np.ndarray) else resid)
            for layer in range(start_at_layer, stop):
                x = self.arch.block(ctx, layer, x, batch)
            if stop_at_layer is None:
                x = self.arch.unembed(ctx, x if logit_rows is None else self.ops.take_rows(x, logit_rows))
            self.ops.flush()  # a GPU holds the last ops back for fusion: launch them before anyone reads the results
            return x, rows
        finally:
            for seq in seqs:
                self.kv.free(seq)

    def harvest(self, source: Any, names: Sequence[str], out: Any, **options: Any) -> dict:
        """Stream ``names``' activations over a dataset to shards under ``out``; ``rocmforge.harvest.harvest``."""
        from rocmforge.harvest import harvest
        return harvest(self, source, names, out, **options)

    def unembed_quietly(self, resid: np.ndarray) -> np.ndarray:
        """Residual stream ``[..., d_model]`` -> logits ``[..., d_vocab]`` through the final norm, firing no hooks."""
        resid = np.asarray(resid, np.float32)
        ctx = dataclasses.replace(self.ctx, hooks=Hooks())
        logits = self.ops.to_host(self.arch.unembed(ctx, self.ops.from_host(resid.reshape(-1, resid.shape[-1]))))
        return logits.reshape(resid.shape[:-1] + (logits.shape[-1],))


def _pad_host(parts: list[np.ndarray]) -> np.ndarray:
    longest = max(len(p) for p in parts)
    out = np.zeros((len(parts), longest, *parts[0].shape[1:]), np.float32)
    for i, part in enumerate(parts):
        out[i, :len(part)] = part
    return out
