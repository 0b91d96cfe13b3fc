"""The numpy twin of ``kernels/sample_rows.hip``: the next token of every row of a batch from its logits, with
``rocmforge.sampler``'s chain (llama.cpp's order) and the row's grammar mask, in the arrays the kernel reads.

logit bias -> penalties -> grammar mask -> top-k -> top-p -> min-p -> temperature -> draw

The arguments are the kernel's: per row ``fparams[8]`` (temperature, top_p, min_p, repeat_penalty,
frequency_penalty, presence_penalty, the uniform draw u, unused), ``iparams[2]`` (top_k, number of adjusted ids),
``adjust_ids[cap]`` with ``adjust[cap, 2]`` (bias, count in the penalty window), and ``masks[rows, 1 + words]``
(a flag, then the packed bitmask of allowed tokens; None: no grammar anywhere). As in the kernel, top-k, top-p
and min-p each keep every finite logit at or above a threshold, top-p's probability mass is counted in 32.32
fixed point, and the draw is the inverse CDF over the survivors in token-id order. The kernel sums in float32
with the device's ``expf``, so a draw that lands within rounding of a boundary may differ; everything else is
the same decision.

>>> import numpy as np
>>> logits = np.array([[1.0, 3.0, 2.0, 0.0]], np.float32)
>>> greedy = np.zeros((1, 8), np.float32)
>>> greedy[0, 1] = 1.0  # top_p
>>> masks = np.array([[1, 0b1101]], np.int32)  # token 1 (the largest logit) is not allowed
>>> sample_rows(logits, greedy, np.zeros((1, 2), np.int32), np.zeros((1, 0), np.int32),
...             np.zeros((1, 0, 2), np.float32), masks).tolist()
[2]
"""
from __future__ import annotations

import math

import numpy as np

FIXED_ONE = np.float32(4294967296.0)  # 2**32: exp(x - max) as a 32.32 fixed-point weight


def sample_rows(logits: np.ndarray, fparams: np.ndarray, iparams: np.ndarray, adjust_ids: np.ndarray,
                adjust: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """The sampled token of each row of ``logits [rows, vocab]`` -> int32 ``[rows]`` (-1 where every token is
    banned). ``logits`` is left untouched (the kernel adjusts its own copy in place)."""
    out = np.empty(len(logits), np.int32)
    for row in range(len(logits)):
        x = logits[row].astype(np.float32, copy=True)
        n_adjust = int(iparams[row, 1])
        _adjust(x, adjust_ids[row, :n_adjust], adjust[row, :n_adjust], fparams[row])
        if masks is not None and masks[row, 0] != 0:
            allowed = np.unpackbits(masks[row, 1:].view(np.uint8), count=len(x), bitorder="little").view(bool)
            x[~allowed] = -np.inf
        out[row] = _sample(x, fparams[row], int(iparams[row, 0]))
    return out


def _adjust(x: np.ndarray, ids: np.ndarray, bias_counts: np.ndarray, fp: np.ndarray) -> None:
    """Logit bias, then llama.cpp's penalties on the ids seen in the window (a count of 0: bias only)."""
    repeat, frequency, presence = fp[3], fp[4], fp[5]
    v = x[ids] + bias_counts[:, 0]
    count = bias_counts[:, 1]
    seen = count > 0
    penalized = np.where(v <= 0, v * repeat, v / repeat) - (count * frequency + presence)
    x[ids] = np.where(seen, penalized, v).astype(np.float32)


def _sample(x: np.ndarray, fp: np.ndarray, top_k: int) -> int:
    temperature, top_p, min_p, u = fp[0], fp[1], fp[2], fp[6]
    best = int(np.argmax(x))  # the first of equal maxima: the lowest id
    m = x[best]
    if m == -np.inf:
        return -1
    if temperature == 0:
        return best
    finite = np.float32(-np.finfo(np.float32).max)
    threshold = finite
    if 0 < top_k < len(x):
        threshold = max(finite, np.partition(x, len(x) - top_k)[len(x) - top_k])
    if top_p < 1:
        survivors = np.sort(x[x >= threshold])[::-1]
        mass = (np.exp(survivors - m) * FIXED_ONE).astype(np.uint64)
        target = max(1, math.ceil(float(top_p) * float(mass.sum(dtype=np.uint64))))
        reached = np.cumsum(mass, dtype=np.uint64) >= target
        threshold = max(threshold, survivors[int(np.argmax(reached))] if reached.any() else survivors[-1])
    if min_p > 0:
        bound = float(m) + math.log(float(min_p))  # in double, as the sampler compares
        f = np.float32(bound)
        threshold = max(threshold, f if float(f) >= bound else np.nextafter(f, np.float32(np.inf)))
    ids = np.flatnonzero(x >= threshold)
    cdf = np.cumsum(np.exp((x[ids] - m) / temperature, dtype=np.float32), dtype=np.float64)
    index = int(np.searchsorted(cdf, float(u) * cdf[-1], side="right"))
    return int(ids[min(index, len(ids) - 1)])
