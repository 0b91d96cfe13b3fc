"""Built-in activation edits that run where the activation is (on the GPU: one ``edit_rows`` kernel, no host copy).

Each returns a device hook for ``model.hooks([(name, edit)])`` / ``run_with_hooks``: zero or mean ablation,
adding a steering vector, patching from another run's cached activation, scaling attention heads. ``positions``
are rows of the activation (in a batched run, rows of the flat batch); ``heads`` pick head columns of
``[pos, head, d]`` points (q, k, v, z) or head blocks of ``[head, pos, key_pos]`` points (scores, pattern).
The activation itself is never written: the edit writes a copy (a cache may hold the original).

>>> import numpy as np
>>> from rocmforge.hooks import HookPoint
>>> act = np.ones((3, 2, 2), np.float32)                     # [pos, head, d_head], e.g. hook_z
>>> zero_ablate(heads=[1])(act, HookPoint("blocks.0.attn.hook_z"))[0].tolist()
[[1.0, 1.0], [0.0, 0.0]]
>>> add_vector(np.array([1, 2], np.float32), positions=[2])(np.zeros((3, 2), np.float32), HookPoint("x")).tolist()
[[0.0, 0.0], [0.0, 0.0], [1.0, 2.0]]
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rocmforge.activation_cache import _HostOps
from rocmforge.hooks import HookPoint
from rocmforge.ops.edit_rows import edit_rows


class _NumpyOps(_HostOps):
    def copy(self, x: np.ndarray) -> np.ndarray:
        return np.array(x, dtype=np.float32, copy=True)

    def from_host(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32)

    def edit_rows(self, x: np.ndarray, rows: np.ndarray, col0: int, n_cols: int, keep: float,  # type: ignore[override]
                  src: np.ndarray | None = None, src_rows: np.ndarray | None = None, src_col0: int = 0,
                  take: float = 1.0) -> np.ndarray:
        return edit_rows(x, rows, col0, n_cols, keep, src, rows if src_rows is None else src_rows, src_col0, take)


_NUMPY = _NumpyOps()


class Edit:
    """``new = keep * act + take * source`` on the selected rows/heads of a copy of ``act``; a device hook."""

    on_device = True
    reads_values = False  # the backend orders its own kernels: no flush needed before the call

    def __init__(self, keep: float, source: Any = None, take: float = 1.0, broadcast: bool = False,
                 positions: Sequence[int] | None = None, heads: Sequence[int] | None = None) -> None:
        self.keep, self.source, self.take, self.broadcast = float(keep), source, float(take), broadcast
        self.positions = None if positions is None else np.asarray(positions, dtype=np.int64)
        self.heads = None if heads is None else [int(h) for h in heads]
        self._uploaded: dict[int, tuple[Any, Any]] = {}  # id(ops) -> (ops, source on that backend)

    def _source_on(self, ops: Any) -> Any:
        if self.source is None:
            return None
        if not isinstance(self.source, np.ndarray) or ops is _NUMPY:
            return self.source  # already the backend's array (a cached activation)
        held = self._uploaded.get(id(ops))
        if held is None or held[0] is not ops:
            held = self._uploaded[id(ops)] = (ops, ops.from_host(np.ascontiguousarray(self.source, np.float32)))
        return held[1]

    def __call__(self, act: Any, hook: HookPoint) -> Any:
        ops = hook.ops if hook.ops is not None and hasattr(hook.ops, "edit_rows") else _NUMPY
        shape = tuple(act.shape)
        if hook.name.endswith(("hook_attn_scores", "hook_pattern")):  # [head, pos, key_pos] as [head * pos, key_pos]
            n_heads, t, width = shape
            query_rows = np.arange(t) if self.positions is None else self.positions % t
            heads = np.arange(n_heads) if self.heads is None else np.asarray(self.heads)
            rows, blocks, view_shape = (heads[:, None] * t + query_rows[None, :]).ravel(), [(0, width)], (n_heads * t, width)
        else:  # [pos, ...] as [pos, features]; a head is a column block of [pos, head, d]
            t, width = shape[0], int(np.prod(shape[1:]))
            d = shape[2] if len(shape) == 3 else width
            rows = np.arange(t) if self.positions is None else self.positions % t
            blocks = [(h * d, d) for h in self.heads] if self.heads is not None else [(0, width)]
            view_shape = (t, width)
        out = ops.copy(act).reshape(view_shape)
        src = self._source_on(ops)
        if src is not None:
            src = src.reshape((1, -1) if self.broadcast else view_shape)
        src_rows = (np.zeros(len(rows), np.int64) if self.broadcast else rows) if src is not None else None
        for col0, n_cols in blocks:
            ops.edit_rows(out, rows, col0, n_cols, self.keep, src, src_rows, col0, self.take)
        return out.reshape(shape)


def zero_ablate(positions: Sequence[int] | None = None, heads: Sequence[int] | None = None) -> Edit:
    """Set the activation (or the chosen positions / heads of it) to zero."""
    return Edit(0.0, positions=positions, heads=heads)


def mean_ablate(mean: Any, positions: Sequence[int] | None = None, heads: Sequence[int] | None = None) -> Edit:
    """Replace each chosen position with ``mean`` (the activation of ONE position, e.g. ``[d_model]`` or
    ``[head, d_head]``; a dataset mean such as ``cache[name].numpy().mean(0)``). With ``heads``, ``mean`` is the
    whole position's mean and only the chosen heads' part of it is used."""
    return Edit(0.0, np.asarray(mean, np.float32).ravel() if isinstance(mean, np.ndarray) else mean,
                broadcast=True, positions=positions, heads=heads)


def add_vector(vector: Any, scale: float = 1.0, positions: Sequence[int] | None = None) -> Edit:
    """Add ``scale * vector`` (one position's shape) at every position, or the chosen ones: steering (ActAdd)."""
    return Edit(1.0, np.asarray(vector, np.float32).ravel() if isinstance(vector, np.ndarray) else vector,
                take=scale, broadcast=True, positions=positions)


def patch_from(source: Any, positions: Sequence[int] | None = None, heads: Sequence[int] | None = None) -> Edit:
    """Put back ``source`` (an activation of the same shape from another run, e.g. a clean run's cache entry,
    on the device or the host) at the chosen positions / heads, or everywhere."""
    return Edit(0.0, source, positions=positions, heads=heads)


def scale_heads(factor: float, heads: Sequence[int]) -> Edit:
    """Multiply the chosen heads by ``factor`` (0 ablates them, 2 doubles them)."""
    return Edit(float(factor), heads=heads)
