"""What hooks need from the GPU backend, mixed into ``GpuBackend``: activations that stay on the device.

- ``snapshot(x)``: what ``run_with_cache`` keeps. Every GPU op writes a new buffer (none updates its input in
  place), so a reference is already a stable snapshot: caching every hook point costs no copy and no launch.
- ``copy``, ``fresh_zeros``, ``edit_rows`` (``kernels/edit_rows.hip``): the built-in edits (ablate, patch,
  steer, scale a head) and padding of batched caches, without a host round trip.
- ``as_array``: a hook's DLPack result (torch, CuPy, JAX) as a ``DeviceArray`` over the same memory.
- ``attention_scores`` / ``attention_mix``: the hooked attention path on the device (``kernels/attention.hip``).

>>> GpuHookOps.snapshot.__doc__.split(":")[0]
'The array itself'
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rocmforge.backends import dlpack
from rocmforge.backends.device_memory import DeviceArray
from rocmforge.backends.runtime import f32, i32, i64, ptr
from rocmforge.kv_cache import KVCache, Segment


class GpuHookOps:
    """Mixin of ``GpuBackend`` (uses its ``rt``, ``_empty``, ``_flush``, ``_ints`` and ``_launch``)."""

    def flush(self) -> None:
        """Launch the work held back for fusion, so ``x``'s values are queued before anything reads them."""
        self._flush()

    def snapshot(self, x: DeviceArray) -> DeviceArray:
        """The array itself: GPU ops never write into an existing activation, so it stays as it is."""
        return x

    def copy(self, x: DeviceArray) -> DeviceArray:
        out = self._empty(x.shape, x.dtype)
        self._flush()
        self.rt.copy(out.address, x.address, x.nbytes)
        return out

    def fresh_zeros(self, shape: tuple[int, ...]) -> DeviceArray:
        """Zeros from the activation pool (``zeros`` takes KV-cache memory after ``prepare``)."""
        out = self._empty(shape)
        self.rt.memset(out.address, 0, out.nbytes)
        return out

    def edit_rows(self, x: DeviceArray, rows: np.ndarray, col0: int, n_cols: int, keep: float,
                  src: DeviceArray | None = None, src_rows: np.ndarray | None = None, src_col0: int = 0,
                  take: float = 1.0) -> DeviceArray:
        """``rocmforge.ops.edit_rows`` in place on the 2-D device array ``x``; returns ``x``."""
        if len(rows) == 0 or n_cols == 0:
            return x
        src_rows = rows if src_rows is None else src_rows
        src_args = [ptr(src.address), i64(src.shape[-1]), ptr(self._ints(np.asarray(src_rows)).address)] if src is not None \
            else [ptr(0), i64(0), ptr(0)]
        self._launch("edit_rows", "edit_rows", (len(rows), -(-n_cols // 256)), 256,
                     [ptr(x.address), i64(x.shape[-1]), ptr(self._ints(np.asarray(rows)).address), i32(col0), i32(n_cols),
                      f32(keep), *src_args, i32(src_col0), f32(take)])
        return x

    def as_array(self, obj: Any, shape: tuple[int, ...]) -> DeviceArray:
        """A hook's result on this device: a ``DeviceArray`` as is, any other DLPack array without a copy."""
        array = dlpack.import_array(obj, self.rt)
        if array.size != int(np.prod(shape)):
            raise ValueError(f"a hook returned shape {array.shape}, expected {shape}")
        return array.reshape(shape)

    def attention_scores(self, q: DeviceArray, cache: KVCache, layer: int, segment: Segment, scale: float,
                         window: int | None, softcap: float | None) -> DeviceArray:
        t, heads, d = q.shape
        k_pool, n_keys = cache.k[layer], len(segment.key_slots)
        out = self._empty((heads, t, n_keys))
        self._launch("attention", "attn_scores", (-(-n_keys // 256), t, heads), 256,
                     [ptr(q.address), ptr(k_pool.address), ptr(self._ints(segment.key_slots).address),
                      ptr(self._ints(segment.positions).address), ptr(out.address), i32(t), i32(n_keys), i32(heads),
                      i32(k_pool.shape[1]), i32(d), f32(scale), f32(softcap or 0.0), i32(window or 0)])
        return out

    def attention_mix(self, pattern: DeviceArray, cache: KVCache, layer: int, segment: Segment) -> DeviceArray:
        heads, t, n_keys = pattern.shape
        v_pool = cache.v[layer]
        d = v_pool.shape[2]
        out = self._empty((t, heads, d))
        self._launch("attention", "attn_mix", (t, heads), max(self.rt.warp_size, min(256, d)),
                     [ptr(pattern.address), ptr(v_pool.address), ptr(self._ints(segment.key_slots).address),
                      ptr(out.address), i32(t), i32(n_keys), i32(heads), i32(v_pool.shape[1]), i32(d)])
        return out
