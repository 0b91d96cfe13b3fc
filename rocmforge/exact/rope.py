"""ggml's CPU ``rope`` (ops.cpp, ``ggml_compute_forward_rope_flt``) for the normal (adjacent pairs) and NeoX
(halves) layouts, without YaRN (``ext_factor = 0``, ``attn_factor = 1``).

Per position ``p`` ggml fills a cache of cos/sin: ``theta = (float)p``, and for each pair ``i``
``cos = cosf(freq_scale * (theta / ff_i))``, ``sin = sinf(...)``, then ``theta *= theta_scale`` (float32) with
``theta_scale = powf(base, -2.0f/n_dims)``. cosf/sinf/powf here are the C library's (ctypes), the same functions
llama.cpp calls. The rotation ``x0*cos - x1*sin``, ``x0*sin + x1*cos`` is compiled by GCC with fp-contract on:
``fma(x0, cos, -(x1*sin))`` and ``fma(x0, sin, x1*cos)``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

import numpy as np
from numba import njit, prange

from rocmforge.exact.simd import fma32
from rocmforge.exact.threads import ELEMENT_WORK, split_rows

_libm = ctypes.CDLL(ctypes.util.find_library("m"))
for _name in ("cosf", "sinf", "powf"):
    getattr(_libm, _name).restype = ctypes.c_float
_libm.cosf.argtypes = _libm.sinf.argtypes = [ctypes.c_float]
_libm.powf.argtypes = [ctypes.c_float, ctypes.c_float]


@lru_cache(maxsize=65536)
def _cos_sin(position: int, base: float, n_dims: int, freq_scale: float,
             freq_factors: tuple[float, ...] | None) -> np.ndarray:
    """ggml_rope_cache_init for one position: float32 ``[n_dims/2, 2]`` (cos, sin)."""
    f32 = np.float32
    theta_scale = f32(_libm.powf(f32(base), f32(-2.0) / f32(n_dims)))
    theta = f32(position)
    cache = np.empty((n_dims // 2, 2), dtype=np.float32)
    for i in range(n_dims // 2):
        ff = f32(1.0) if freq_factors is None else f32(freq_factors[i])
        angle = f32(freq_scale) * (theta / ff)
        cache[i] = _libm.cosf(angle), _libm.sinf(angle)
        theta = theta * theta_scale
    return cache


@njit(cache=True, nogil=True)
def _rotate(x, cos_sin, neox, n_dims, out, start, stop):  # pragma: no cover - compiled
    n_heads, d = x.shape[1], x.shape[2]
    half = n_dims // 2
    for t in range(start, stop):
        for h in range(n_heads):
            for i in range(half):
                c = cos_sin[t, i, 0]
                s = cos_sin[t, i, 1]
                a = i if neox else 2 * i
                b = i + half if neox else 2 * i + 1
                x0 = x[t, h, a]
                x1 = x[t, h, b]
                out[t, h, a] = fma32(x0, c, -(x1 * s))
                out[t, h, b] = fma32(x0, s, x1 * c)
            for i in range(n_dims, d):
                out[t, h, i] = x[t, h, i]


@njit(cache=True, parallel=True)
def _rotate_parallel(args, n_rows, n_slices):  # pragma: no cover - compiled
    for i in prange(n_slices):  # one slice of rows per thread (threads.split_rows)
        _rotate(*args, n_rows * i // n_slices, n_rows * (i + 1) // n_slices)


def rope(x: np.ndarray, positions: np.ndarray, theta: float, neox: bool, n_rot: int,
         freq_factors: np.ndarray | None = None, freq_scale: float = 1.0) -> np.ndarray:
    """Rotate float32 ``x`` ``[n, heads, d_head]`` for ``positions`` ``[n]`` (first ``n_rot`` dims) as ggml does.

    >>> import numpy as np
    >>> rope(np.ones((1, 1, 2), np.float32), np.array([0]), 10000.0, neox=False, n_rot=2).tolist()
    [[[1.0, 1.0]]]
    """
    return rotate(x, rope_table(positions, theta, n_rot, freq_factors, freq_scale), neox, n_rot)


def rope_table(positions: np.ndarray, theta: float, n_rot: int, freq_factors: np.ndarray | None = None,
               freq_scale: float = 1.0) -> np.ndarray:
    """ggml's cos/sin cache for ``positions`` ``[n]``: float32 ``[n, n_rot/2, 2]`` (what ``rotate`` takes; every
    layer of a batch rotates at the same positions, so a caller may keep it)."""
    factors = None if freq_factors is None else tuple(float(f) for f in np.asarray(freq_factors, np.float32))
    return np.stack([_cos_sin(int(p), float(theta), int(n_rot), float(freq_scale), factors) for p in positions])


def rotate(x: np.ndarray, cos_sin: np.ndarray, neox: bool, n_rot: int) -> np.ndarray:
    """Rotate float32 ``x`` ``[n, heads, d_head]`` by ``rope_table``'s ``cos_sin`` (first ``n_rot`` dims)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    split_rows(_rotate_parallel, _rotate, (x, cos_sin, bool(neox), int(n_rot), out), x.shape[0],
               work=x.size * ELEMENT_WORK)
    return out
