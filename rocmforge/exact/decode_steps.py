"""A decode step's non-matmul work as a few numba calls: the ops between two matmuls of one block, fused, each the
same ``rocmforge.exact`` kernel the op-by-op forward calls (so the same bits). ``backends.exact_decode`` runs a
whole block with them when no hook is registered; one token costs ~5 calls per block instead of ~60 Python-level
ops.

Every step ends by rounding its output for the matmul that reads it (``quantize_row``: q8_0/q8_1 blocks, plus the
lane corrections ``offset * sum x`` of the in-place lane kernels, ``dot_q8_0.lane_corrections``); ``offset`` -1
leaves the rounding to the matmul (the K-quant and float types round on their own).

- ``norm_step``: ``rms_norm`` (the block's input norm);
- ``attention_step``: per-head QK-norm, ``rope`` of q and k, the KV write, attention over the sequence's cached
  keys (one query row: ggml's ``vec_dot`` order, or tinyBLAS's with ``tinyblas``);
- ``residual_step``: optional norm of the sublayer's output (Gemma's post-norms), the residual add, optional
  norm of the sum (the next sublayer's input);
- ``glu_step``: SwiGLU, or GeGLU through ggml's fp16 table.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from rocmforge.exact.attention import _attention
from rocmforge.exact.geglu import _geglu
from rocmforge.exact.q8_activations import _quantize
from rocmforge.exact.rms_norm import _rms_norm
from rocmforge.exact.rope import _rotate
from rocmforge.exact.swiglu import _swiglu


@njit(cache=True, nogil=True)
def quantize_row(x, qs, d, s, corr, offset):  # pragma: no cover - compiled
    """One float32 row ``x`` ``[k]`` -> q8 blocks ``qs`` ``[1, k/32, 32]``, ``d``, ``s`` ``[1, k/32]`` and, for
    ``offset`` > 0, ``corr`` ``[k/4]`` (as ``dot_q8_0.lane_corrections``); nothing for ``offset`` -1."""
    if offset < 0:
        return
    _quantize(x.reshape(1, x.size // 32, 32), qs, d, s, 0, 1)
    if offset > 0:
        flat = qs.reshape(-1)
        for i in range(corr.size):
            corr[i] = offset * (np.int32(flat[4 * i]) + np.int32(flat[4 * i + 1]) + np.int32(flat[4 * i + 2])
                                + np.int32(flat[4 * i + 3]))


@njit(cache=True, nogil=True)
def norm_step(resid, weight, eps, x, qs, d, s, corr, offset):  # pragma: no cover - compiled
    """``x = rms_norm(resid) * weight`` (``[1, d_model]``), rounded for the next matmul."""
    _rms_norm(resid, weight, eps, x, 0, 1)
    quantize_row(x.reshape(-1), qs, d, s, corr, offset)


@njit(cache=True, nogil=True)
def attention_step(q, k, v, q_norm, k_norm, eps, cos_sin, neox, n_rot, cache_k, cache_v, slot, key_slots, first,
                   last, scale, tinyblas, z, qs, d, s, corr, offset):  # pragma: no cover - compiled
    """One query row: q ``[1, H, d]``, k ``[1, H_kv, d]``, v ``[1, H_kv, d_v]`` -> ``z`` ``[1, H, d_v]`` (QK-norm when
    ``q_norm`` is not empty, rope by ``cos_sin``, k and v written at cache ``slot``, attention over ``key_slots``
    with keys ``first[0]..last[0]``), rounded for the output matmul."""
    n_heads, n_kv_heads, d_head = q.shape[1], k.shape[1], q.shape[2]
    if q_norm.size:
        q_normed, k_normed = np.empty_like(q), np.empty_like(k)
        _rms_norm(q.reshape(n_heads, d_head), q_norm, eps, q_normed.reshape(n_heads, d_head), 0, n_heads)
        _rms_norm(k.reshape(n_kv_heads, d_head), k_norm, eps, k_normed.reshape(n_kv_heads, d_head), 0, n_kv_heads)
        q, k = q_normed, k_normed
    q_rot, k_rot = np.empty_like(q), np.empty_like(k)
    _rotate(q, cos_sin, neox, n_rot, q_rot, 0, 1)
    _rotate(k, cos_sin, neox, n_rot, k_rot, 0, 1)
    cache_k[slot] = k_rot[0]
    cache_v[slot] = v[0]
    n_keys, start = key_slots.size, key_slots[0]
    in_order = True  # one run of slots (a sequence's blocks one after another): the cache itself, no copy
    for j in range(n_keys):
        in_order = in_order and key_slots[j] == start + j
    if in_order:
        keys, values = cache_k[start:start + n_keys], cache_v[start:start + n_keys]
    else:
        keys = np.empty((n_keys, n_kv_heads, d_head), dtype=np.float32)
        values = np.empty((n_keys, n_kv_heads, cache_v.shape[2]), dtype=np.float32)
        for j in range(n_keys):
            keys[j] = cache_k[key_slots[j]]
            values[j] = cache_v[key_slots[j]]
    unused = np.empty((0, 0, 0, 0), dtype=np.float32)  # the prefill lane layouts
    _attention(q_rot, keys, unused, values, unused, first, last, scale, n_heads // n_kv_heads, tinyblas, z, 0, 1)
    quantize_row(z.reshape(-1), qs, d, s, corr, offset)


@njit(cache=True, nogil=True)
def residual_step(resid, delta, post_norm, norm, eps, resid_out, x, qs, d, s, corr,
                  offset):  # pragma: no cover - compiled
    """``resid_out = resid + rms_norm(delta) * post_norm`` (just ``+ delta`` when ``post_norm`` is empty), then
    ``x = rms_norm(resid_out) * norm`` rounded for the next matmul (nothing when ``norm`` is empty)."""
    if post_norm.size:
        normed = np.empty_like(delta)
        _rms_norm(delta, post_norm, eps, normed, 0, 1)
        delta = normed
    for i in range(resid.shape[1]):
        resid_out[0, i] = resid[0, i] + delta[0, i]
    if norm.size:
        _rms_norm(resid_out, norm, eps, x, 0, 1)
        quantize_row(x.reshape(-1), qs, d, s, corr, offset)


@njit(cache=True, nogil=True)
def glu_step(gate, up, gelu_table, act, qs, d, s, corr, offset):  # pragma: no cover - compiled
    """``act = silu(gate) * up``, or ``gelu(gate) * up`` through ``gelu_table`` when it is not empty, rounded for
    the down matmul."""
    if gelu_table.size:
        _geglu(gate, up, gelu_table, act, 0, 1)
    else:
        _swiglu(gate, up, act)
    quantize_row(act.reshape(-1), qs, d, s, corr, offset)
