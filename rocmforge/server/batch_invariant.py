"""CPU backends whose forward gives each row the same bits whatever else is in the batch (``BatchInvariantCpuBackend``
for ``device="cpu"``, ``BatchInvariantExactBackend`` for ``"cpu-exact"``).

Why the server needs it: OpenBLAS picks its kernel, its blocking and its thread split from the shape of the
call, so a row's result can depend on how many rows share the call and where it sits among them. Measured here
(OpenBLAS 0.3.31) for ``x @ W.T`` with the activations ``x`` as the left operand: with the Haswell kernels and 1
thread, rows 6-15 of a 16-row call round differently from rows 0-5; with 2 threads 1, 2-6, 7-16 and 17-32 rows
each round differently. With the weight as the left operand, ``(W @ x.T).T``, and the activations as the
columns, a call of a *fixed* number of columns gave every column the same bits at any position among any others
(tiles of 8 and 16 columns, Haswell and SkylakeX kernels, 1 and 2 threads, every SmolLM2 weight shape; a varying
column count does not: 1 column goes to GEMV, and the SkylakeX kernels round small counts differently). So the
product runs on tiles of exactly ``TILE`` = 16 rows, the last one zero-padded. Attention runs prompt chunks one
sequence at a time and decode queries on keys padded to a length their own sequence decides
(``BatchInvariantCpuBackend.attention``), and the scheduler cuts prompts at fixed chunk boundaries, so with this
backend a whole forward is batch-invariant: "same seed, same text, alone or batched" holds bit for bit
(tests/test_server.py).

Why weight-left tiles of 16: OpenBLAS then streams each weight once for a whole 16-sequence decode step, and
its SkylakeX kernel multiplies a 16-column weight-left product about 2x faster than 8 activation-left rows
(BENCHMARKS.md, "Server on CPU"). A lone stream pays for 16 rows, which costs little more than one: the step is bound
by reading the weights.

>>> import numpy as np
>>> from gguf import GGMLQuantizationType
>>> from rocmforge.backends.cpu import CpuWeight
>>> w = CpuWeight(np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32), GGMLQuantizationType.F32)
>>> x = np.random.default_rng(1).standard_normal((20, 32)).astype(np.float32)
>>> backend = BatchInvariantCpuBackend()
>>> bool(np.array_equal(backend.matmul(x, w)[11], backend.matmul(x[11:12], w)[0]))
True
"""
from __future__ import annotations

from typing import Any

import numpy as np

from gguf import GGMLQuantizationType as T

from rocmforge.backends.cpu import CpuBackend, CpuWeight
from rocmforge.backends.exact import ExactCpuBackend, ExactWeight
from rocmforge.kv_cache import Batch, KVCache, Segment
from rocmforge.ops.attention import attention
from rocmforge.ops.softmax import softmax

TILE = 16
KEY_BUCKET = 64  # decode attention pads each sequence's keys to a multiple of this (its own length decides)


class BatchInvariantCpuBackend(CpuBackend):
    """``CpuBackend`` whose matmul multiplies fixed tiles of ``TILE`` rows, weight on the left (see the module
    docstring). Weights stored as one group (q/k/v, gate/up) are multiplied as the group at any row count:
    one call instead of three, and the same call alone or batched."""

    def matmul(self, x: np.ndarray, weight: CpuWeight) -> np.ndarray:
        if self.round_activations:
            x = self._rounded(x, weight.ggml_type)
        if weight.group is None:
            return invariant_product(x, weight.matrix)
        last = self._last_group
        if last is None or last[0] is not x or last[1] is not weight.group:
            last = self._last_group = (x, weight.group, invariant_product(x, weight.group))
        return last[2][:, weight.rows]


    def attention(self, q: np.ndarray, cache: KVCache, layer: int, batch: Batch, scale: float,
                  window: int | None, softcap: float | None) -> np.ndarray:
        """Decode queries (one new token that sees all of its sequence's keys) of sequences whose key counts
        round up to the same multiple of ``KEY_BUCKET`` go through attention together; the rest one at a time.

        Together is still batch-invariant: each sequence's keys are zero-padded to its *own* bucket length and
        masked, so its scores and mixes are matrix products of the same shapes, one per (sequence, kv head) in
        numpy's stacked matmul, and its softmax sums the same row, whatever other sequences share the call. It
        replaces ~25 numpy calls per sequence and layer (a 16-sequence step spent ~20% of its time there) by
        ~15 per bucket."""
        z = np.empty(q.shape[:2] + (cache.v[layer].shape[-1],), dtype=np.float32)
        buckets: dict[int, list[Segment]] = {}
        for seg in batch.segments:
            n_keys = len(seg.key_slots)
            decode = seg.rows.stop - seg.rows.start == 1 and softcap is None and (window is None or n_keys <= window)
            if decode:
                buckets.setdefault(-(-n_keys // KEY_BUCKET) * KEY_BUCKET, []).append(seg)
            else:
                z[seg.rows] = attention(q[seg.rows], cache.k[layer][seg.key_slots], cache.v[layer][seg.key_slots],
                                        seg.positions, scale, window, softcap)
        for padded, segs in buckets.items():
            rows = np.array([seg.rows.start for seg in segs])
            z[rows] = _padded_decode_attention(q[rows], cache.k[layer], cache.v[layer],
                                               [seg.key_slots for seg in segs], padded, scale)
        return z


def _padded_decode_attention(q: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray, key_slots: list[np.ndarray],
                             padded: int, scale: float) -> np.ndarray:
    """One decode query per sequence ``q`` ``[G, H, d]`` over its keys, each padded to ``padded`` -> ``[G, H, d_v]``."""
    n_seq, n_heads, d_head = q.shape
    n_kv_heads = k_pool.shape[1]
    # padding reads the sequence's own first key/value again: its score is masked to -inf and its weight is
    # exactly 0, and a finite value times 0 adds nothing (its own, so no other sequence's data can leak in)
    slots = np.empty((n_seq, padded), dtype=np.int64)
    valid = np.zeros((n_seq, padded), dtype=bool)
    for i, own in enumerate(key_slots):
        slots[i], slots[i, :len(own)], valid[i, :len(own)] = own[0], own, True
    keys, values = k_pool[slots], v_pool[slots]                                  # [G, L, H_kv, d]
    q_grouped = q.reshape(n_seq, n_kv_heads, n_heads // n_kv_heads, d_head)      # GQA: heads of one kv head together
    scores = q_grouped @ keys.transpose(0, 2, 3, 1) * np.float32(scale)          # [G, H_kv, group, L]
    scores = np.where(valid[:, None, None, :], scores, np.float32(-np.inf))
    mixed = softmax(scores) @ values.transpose(0, 2, 1, 3)                       # [G, H_kv, group, d_v]
    return mixed.reshape(n_seq, n_heads, -1)


def invariant_product(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``x @ matrix.T`` (``[n, in] x [out, in] -> [n, out]``) with each row's bits independent of the others.

    >>> import numpy as np
    >>> w = np.arange(6, dtype=np.float32).reshape(3, 2)
    >>> invariant_product(np.ones((1, 2), np.float32), w).tolist()
    [[1.0, 5.0, 9.0]]
    """
    n = x.shape[0]
    out = np.empty((n, matrix.shape[0]), dtype=np.float32)
    for start in range(0, n, TILE):
        rows = min(TILE, n - start)
        tile = x[start:start + TILE]
        if rows < TILE:
            tile = np.concatenate([tile, np.zeros((TILE - rows, x.shape[1]), dtype=np.float32)])
        out[start:start + rows] = (matrix @ tile.T)[:, :rows].T
    return out


class BatchInvariantExactBackend(ExactCpuBackend):
    """``device="cpu-exact"`` with llama.cpp's one batch-dependent choice fixed, for the server.

    Each output of the exact Q4_1/Q5_0/Q8_0 products is the same fma chain however many rows share the call, and
    so are the norms, rope and gate. llama.cpp's kqv product is not: from 2 query rows in a ubatch on it runs
    tinyBLAS's lane order, for 1 row ``ggml_vec_dot_f32``'s. Here every query takes the multi-row order, alone or
    batched: a lone request may then differ from llama.cpp on a near-tie (its decode steps are 1-row ubatches
    there), never from the same request batched. K-quant products switch kernels with the row count (Q4_K
    GEMM/GEMV, the others tiled from 8 rows), and so do float weights (tinyBLAS from 2 rows), so models with them
    are not served batch-invariant on this backend (Q4_0's repacked GEMM and GEMV are the same chain per output)."""

    ROW_INDEPENDENT = frozenset({T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0})

    def kqv_batch_rows(self, ubatch_rows: int) -> int:
        return 2  # tinyBLAS's order for every query row, alone or batched


def use_batch_invariant_backend(model: Any) -> bool:
    """Swap a CPU model's backend for its batch-invariant twin (same weights and cache): ``BatchInvariantCpuBackend``
    on ``device="cpu"``, ``BatchInvariantExactBackend`` on ``"cpu-exact"`` when every weight type allows it.
    False (nothing changed) otherwise."""
    if type(model.ops) is ExactCpuBackend:
        types = {w.ggml_type for block in model.ctx.weights.blocks for w in block.values()
                 if isinstance(w, ExactWeight)} | {model.ctx.weights.output.ggml_type}
        if not types <= BatchInvariantExactBackend.ROW_INDEPENDENT:
            return False
        exact = BatchInvariantExactBackend.__new__(BatchInvariantExactBackend)
        exact.__dict__.update(vars(model.ops))
        model.ops = model.ctx.ops = exact
        return True
    if type(model.ops) is not CpuBackend:
        return False
    backend = BatchInvariantCpuBackend.__new__(BatchInvariantCpuBackend)
    backend.__dict__.update(vars(model.ops))  # the same settings (activation rounding) as the backend it replaces
    model.ops = model.ctx.ops = backend
    return True
