"""``ActivationCache``: the activations of one run (one prompt or a batch) by hook name, where the backend keeps them.

On a GPU backend every entry is a ``DeviceArray``: it speaks DLPack (``torch.from_dlpack(cache[name])`` reads it
without a copy) and ``.numpy()`` copies it to the host. On the CPU entries are numpy arrays. ``to_host()`` gives
the same cache with every entry on the host (what ``run_with_cache(..., device="cpu")`` returns).

A batched cache (``run_with_cache([ids_a, ids_b, ...])``) follows TransformerLens' shapes: ``cache[name]`` is
padded on the right to ``[batch, pos, ...]`` (attention ``[batch, head, pos, key_pos]``) and ``cache.mask``
``[batch, pos]`` is True on real tokens; ``cache.prompt(i)`` is prompt ``i``'s own cache, of views, unpadded.

>>> import numpy as np
>>> cache = ActivationCache({"blocks.0.attn.hook_pattern": np.eye(2)[None]}, n_layers=1)
>>> cache["pattern", 0].shape, cache["blocks.0.attn.hook_pattern"].shape
((1, 2, 2), (1, 2, 2))
>>> flat = {"hook_embed": np.arange(6, dtype=np.float32).reshape(3, 2)}
>>> batch = ActivationCache(flat, 1, prompt_rows=[slice(0, 1), slice(1, 3)])
>>> batch["embed"].tolist(), batch.mask.tolist()
([[[0.0, 1.0], [0.0, 0.0]], [[2.0, 3.0], [4.0, 5.0]]], [[True, False], [True, True]])
>>> batch.prompt(1)["embed"].tolist()
[[2.0, 3.0], [4.0, 5.0]]
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from rocmforge.hooks import act_name

_PER_PROMPT = ("hook_attn_scores", "hook_pattern")  # fire once per prompt: [head, pos, key_pos]


class _HostOps:
    """The few backend methods padding needs, for caches of plain numpy arrays."""

    def fresh_zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, np.float32)

    def edit_rows(self, x: np.ndarray, rows: np.ndarray, col0: int, n_cols: int, keep: float, src: np.ndarray,
                  src_rows: np.ndarray) -> np.ndarray:
        x[rows, col0:col0 + n_cols] = src[src_rows, :n_cols]
        return x


class ActivationCache(Mapping[str, Any]):
    """Activations by hook name, indexable the TransformerLens way (``cache["pattern", 3]``).

    ``activations`` maps a name to its array, or (for a batch, ``prompt_rows`` given: each prompt's rows in the
    flat batch) to the flat ``[sum of pos, ...]`` array, attention names to a list of one array per prompt.
    ``unembed`` maps a residual stream ``[..., d_model]`` to logits (for ``logit_lens``) without firing hooks;
    ``ops`` is the backend whose arrays these are (padding a batch runs there).
    """

    def __init__(self, activations: dict[str, Any], n_layers: int,
                 unembed: Callable[[np.ndarray], np.ndarray] | None = None, *, ops: Any = None,
                 prompt_rows: list[slice] | None = None) -> None:
        self._acts = activations
        self.n_layers = n_layers
        self._unembed = unembed
        self._ops = ops if ops is not None else _HostOps()
        self.prompt_rows = prompt_rows
        self._padded: dict[str, Any] = {}

    # --- lookup ---------------------------------------------------------------------------------------------
    def _name(self, key: str | tuple) -> str:
        if isinstance(key, tuple):
            return act_name(*key, n_layers=self.n_layers)  # type: ignore[misc]
        if key not in self._acts and key in ("embed", "logits", "ln_final"):
            return act_name(key)
        return key

    def __getitem__(self, key: str | tuple) -> Any:
        name = self._name(key)
        try:
            value = self._acts[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in this cache (cached: {len(self._acts)} names; "
                           "was it filtered out by names_filter or past stop_at_layer?)") from None
        if self.prompt_rows is None:
            return value
        if name not in self._padded:
            self._padded[name] = self._pad(name, value)
        return self._padded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def __repr__(self) -> str:
        batch = f", batch={len(self.prompt_rows)}" if self.prompt_rows is not None else ""
        return f"ActivationCache({len(self)} activations, n_layers={self.n_layers}{batch})"

    # --- batches --------------------------------------------------------------------------------------------
    @property
    def lengths(self) -> list[int]:
        """Tokens of each prompt (one entry for an unbatched cache: the rows of its first activation)."""
        if self.prompt_rows is None:
            first = next(iter(self._acts.values()))
            return [first.shape[1] if _per_prompt(next(iter(self._acts))) else first.shape[0]]
        return [r.stop - r.start for r in self.prompt_rows]

    @property
    def mask(self) -> np.ndarray:
        """``[batch, pos]`` bool: True on each prompt's tokens, False on the right padding."""
        lengths = self.lengths
        return np.arange(max(lengths))[None, :] < np.array(lengths)[:, None]

    def flat(self, name: str | tuple) -> Any:
        """``name`` unpadded: a batch's ``[sum of pos, ...]`` rows, prompt after prompt (what harvesting writes)."""
        name = self._name(name)
        value = self._acts[name]
        if isinstance(value, list):
            raise ValueError(f"{name} has one [head, pos, key_pos] array per prompt: use cache.prompt(i)")
        return value

    def prompt(self, i: int) -> "ActivationCache":
        """Prompt ``i``'s own cache (views of the batch's arrays, no padding), as if it had run alone."""
        if self.prompt_rows is None:
            if i != 0:
                raise IndexError(f"an unbatched cache has prompt 0 only, not {i}")
            return self
        rows = self.prompt_rows[i]
        own = {name: value[i] if isinstance(value, list) else _rows(value, rows) for name, value in self._acts.items()}
        return ActivationCache(own, self.n_layers, self._unembed, ops=self._ops)

    def _pad(self, name: str, value: Any) -> Any:
        ops, lengths = self._ops, self.lengths
        n, longest = len(lengths), max(lengths)
        if isinstance(value, list):  # [head, pos, key_pos] per prompt -> [batch, head, longest, longest]
            heads = value[0].shape[0]
            out = ops.fresh_zeros((n * heads * longest, longest))
            for i, (part, t) in enumerate(zip(value, lengths)):
                dst = ((i * heads + np.arange(heads)[:, None]) * longest + np.arange(t)[None, :]).ravel()
                ops.edit_rows(out, dst.astype(np.int64), 0, part.shape[-1], 0.0, part.reshape(heads * t, -1),
                              np.arange(heads * t))
            return out.reshape(n, heads, longest, longest)
        rest = tuple(value.shape[1:])
        width = int(np.prod(rest))
        out = ops.fresh_zeros((n * longest, width))
        dst = np.concatenate([i * longest + np.arange(t) for i, t in enumerate(lengths)])
        ops.edit_rows(out, dst, 0, width, 0.0, value.reshape(value.shape[0], width), np.arange(value.shape[0]))
        return out.reshape((n, longest, *rest))

    # --- host copies and the logit lens ----------------------------------------------------------------------
    def to_host(self) -> "ActivationCache":
        """The same cache with every entry copied to a host numpy array."""
        host = {name: [np.asarray(v) for v in value] if isinstance(value, list) else np.asarray(value)
                for name, value in self._acts.items()}
        return ActivationCache(host, self.n_layers, self._unembed, prompt_rows=self.prompt_rows)

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False) -> np.ndarray:
        """The residual stream as it grows, on the host: ``[component, pos, d_model]``.

        Component ``i`` is the input to layer ``i`` (``resid_pre``; with ``incl_mid`` also each
        ``resid_mid`` after it); the last is the final ``resid_post`` when ``layer`` is None.
        Stops before layer ``layer`` otherwise.
        """
        stop = self.n_layers if layer is None else layer
        parts: list[Any] = []
        for i in range(stop):
            parts.append(self[f"blocks.{i}.hook_resid_pre"])
            if incl_mid:
                parts.append(self[f"blocks.{i}.hook_resid_mid"])
        if layer is None or layer >= self.n_layers:
            parts.append(self[f"blocks.{self.n_layers - 1}.hook_resid_post"])
        return np.stack([np.asarray(p) for p in parts])

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


def _per_prompt(name: str) -> bool:
    return name.endswith(_PER_PROMPT)


def _rows(value: Any, rows: slice) -> Any:
    """Rows ``rows`` of an activation as a view (numpy slice or ``DeviceArray.rows``)."""
    return value.rows(rows.start, rows.stop) if hasattr(value, "rows") else value[rows]
