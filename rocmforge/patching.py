"""Activation patching and steering: which activations carry the difference between two prompts.

Activation patching (Meng et al., 2022; Wang et al., 2022) runs a *corrupted* prompt, puts one
activation back from the *clean* run, and measures how much of the clean behaviour returns. Done
for every (layer, position) of the residual stream, or every (layer, head) of the attention
output ``z``, it maps where the information flows. Steering (Turner et al., 2023, "ActAdd") adds
a direction to the residual stream at one layer while the model generates.

The model is a ``rocmforge.model.Model`` (its ``run_with_cache``, ``hooks`` and ``run_batch``). Sweeps run each
layer's patches as one batched forward with the patch as a device edit (``rocmforge.edits``): on a GPU nothing
crosses to the host but the logits rows the metric reads.

>>> import rocmforge  # doctest: +SKIP
>>> model = rocmforge.load("smollm2-135m")  # doctest: +SKIP
>>> clean = model.tokenize("The Eiffel Tower is in the city of")  # doctest: +SKIP
>>> corrupt = model.tokenize("The Colosseum is in the city of")  # doctest: +SKIP
>>> paris, rome = model.tokenize(" Paris")[0], model.tokenize(" Rome")[0]  # doctest: +SKIP
>>> grid = patch_residual(model, clean, corrupt, logit_diff(paris, rome))  # doctest: +SKIP
>>> grid.shape  # [layer, position]  # doctest: +SKIP
(30, 9)
>>> love = steering_vector(model, model.tokenize("I love"), model.tokenize("I hate"), layer=3)  # doctest: +SKIP
>>> with steering(model, love, layer=3):  # doctest: +SKIP
...     model.generate("I hate you because", max_new_tokens=8, temperature=0)
' of love.\n\nI love you because'
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from rocmforge.hooks import HookPoint, act_name

Metric = Callable[[np.ndarray], float]  # logits [pos, d_vocab] -> one number

_RESIDUAL = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")  # [pos, d_model]
_PER_HEAD = ("z", "q", "rot_q", "k", "rot_k", "v")                           # [pos, head, d]


def logit_diff(correct: int, wrong: int, pos: int = -1) -> Metric:
    """Metric: logit of ``correct`` minus logit of ``wrong`` at position ``pos``.

    It says which rows it reads (``metric.positions``), so a batched sweep unembeds only those.

    >>> import numpy as np
    >>> logit_diff(2, 0)(np.array([[0.0, 0.0, 0.0], [1.0, 5.0, 3.0]]))
    2.0
    """
    def metric(logits: np.ndarray) -> float:
        return float(logits[pos, correct] - logits[pos, wrong])
    metric.positions = (pos,)  # type: ignore[attr-defined]
    return metric


def patch_residual(model: Any, clean: Sequence[int], corrupted: Sequence[int], metric: Metric, *,
                   activation: str = "resid_pre", layers: Sequence[int] | None = None,
                   positions: Sequence[int] | None = None, max_batch: int | None = None) -> np.ndarray:
    """Metric of the corrupted run with the clean residual put back at one (layer, position).

    Returns ``[len(layers), len(positions)]`` (all layers and positions by default). Entry
    ``[i, j]`` patches ``blocks.{layers[i]}.hook_{activation}`` at position ``positions[j]``;
    ``activation`` is any ``[pos, d_model]`` point: resid_pre|mid|post, attn_out, mlp_out.

    Each patched run starts at the patched layer from the corrupted run's residual (the blocks before it would
    compute exactly that). By default (``max_batch=None``) every position of a layer runs in ONE batched forward,
    and a run patched at position ``p`` computes only positions ``p..`` (earlier ones cannot see the patch: their
    keys and values are the corrupted run's, written into its cache), with the patch a device edit; the CPU
    multiplies the whole batch at once. That gives each entry up to float rounding; bit for bit on backends whose
    products are row-independent (``cpu-exact`` with Q4_1/Q5_0/Q8_0 weights). ``max_batch=1`` runs each patch alone over the whole prompt, bit-comparable with
    ``run_with_hooks`` on any backend (slower).
    """
    if activation not in _RESIDUAL:
        raise ValueError(f"residual patching works on {', '.join(_RESIDUAL)}, not {activation!r}")
    positions = [p % len(clean) for p in (range(len(clean)) if positions is None else positions)]
    return _sweep(model, clean, corrupted, metric, activation, layers, [(p, None) for p in positions], max_batch)


def patch_heads(model: Any, clean: Sequence[int], corrupted: Sequence[int], metric: Metric, *,
                activation: str = "z", layers: Sequence[int] | None = None,
                heads: Sequence[int] | None = None, max_batch: int | None = None) -> np.ndarray:
    """Metric of the corrupted run with one head's clean activation put back at every position.

    Returns ``[len(layers), len(heads)]``. ``activation`` is ``z`` (the head's output, default),
    ``q``/``rot_q`` (query heads) or ``k``/``rot_k``/``v`` (key-value heads, fewer with GQA).
    By default every head of a layer runs in one batched forward; ``max_batch=1`` one at a time, as in
    ``patch_residual``.
    """
    if activation not in _PER_HEAD:
        raise ValueError(f"per-head patching works on {', '.join(_PER_HEAD)}, not {activation!r}")
    if heads is None:
        heads = range(model.cfg.n_kv_heads if activation in ("k", "rot_k", "v") else model.cfg.n_heads)
    return _sweep(model, clean, corrupted, metric, activation, layers, [(0, int(h)) for h in heads], max_batch)


def _sweep(model: Any, clean: Sequence[int], corrupted: Sequence[int], metric: Metric, activation: str,
           layers: Sequence[int] | None, variants: list[tuple[int, int | None]], max_batch: int | None) -> np.ndarray:
    """Each layer's ``variants`` (position, None) = that position's row, (0, head) = that head at every position,
    run ``max_batch`` per batched forward (all at once for None) from the corrupted run's residual."""
    if len(clean) != len(corrupted):
        raise ValueError(f"clean and corrupted prompts must have the same number of tokens "
                         f"({len(clean)} vs {len(corrupted)}) so positions line up")
    ops, n_pos = model.ops, len(clean)
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    names = [act_name(activation, layer) for layer in layers]
    _, clean_cache = model.run_with_cache(clean, names_filter=names)
    first = min(layers)
    kept = set(act_name("resid_pre", layer) for layer in layers)
    reuse = max_batch is None  # prefix reuse needs the corrupted keys and values of every later layer
    if reuse:
        kept |= {act_name(n, layer) for layer in range(first, model.cfg.n_layers) for n in ("rot_k", "v")}
    corrupted_logits, corrupted_cache = model.run_with_cache(corrupted, names_filter=kept)
    base = np.array(corrupted_logits, dtype=np.float32)
    scratch = base.copy()  # a full [pos, vocab] for the metric: the patched rows swapped in, then back out
    wanted = getattr(metric, "positions", None) if reuse else None
    result = np.empty((len(layers), len(variants)), np.float64)
    step = len(variants) if max_batch is None else max_batch
    for i, (layer, name) in enumerate(zip(layers, names)):
        for start in range(0, len(variants), step):
            group = variants[start:start + step]
            prefixes = [pos if (reuse and head is None) else 0 for pos, head in group]
            resid = corrupted_cache[act_name("resid_pre", layer)]
            lengths = [n_pos - p for p in prefixes]
            offsets = np.cumsum([0] + lengths[:-1])
            starts = _flat(ops, [ops.take_rows(resid, slice(p, n_pos)) for p in prefixes])
            source = clean_cache[name]

            def put_back(act: Any, hook: HookPoint) -> Any:
                out = ops.copy(act)
                flat = out.reshape(out.shape[0], -1)
                src = source.reshape(n_pos, -1)
                rows = [k for k, (_, head) in enumerate(group) if head is None]
                if rows:  # one position per variant (the first row of its segment when the prefix is reused)
                    dst = np.array([offsets[k] + group[k][0] - prefixes[k] for k in rows], np.int64)
                    ops.edit_rows(flat, dst, 0, flat.shape[1], 0.0, src,
                                  np.array([group[k][0] for k in rows], np.int64), 0, 1.0)
                for k, (_, head) in enumerate(group):
                    if head is not None:  # one head at every position
                        d = out.shape[2]
                        ops.edit_rows(flat, offsets[k] + np.arange(lengths[k]), head * d, d, 0.0, src,
                                      np.arange(n_pos - lengths[k], n_pos), head * d, 1.0)
                return out
            put_back.on_device = True  # type: ignore[attr-defined]
            put_back.reads_values = False  # type: ignore[attr-defined]

            def prefix_kv(l: int, known: Any) -> tuple[Any, Any]:
                k, v = corrupted_cache[act_name("rot_k", l)], corrupted_cache[act_name("v", l)]
                return (_flat(ops, [ops.take_rows(k, slice(0, p)) for p in prefixes if p]),
                        _flat(ops, [ops.take_rows(v, slice(0, p)) for p in prefixes if p]))

            logit_rows = None
            if wanted is not None:  # unembed only the rows the metric reads (those a patch could change)
                picked = [(k, w % n_pos) for k in range(len(group)) for w in wanted if w % n_pos >= prefixes[k]]
                logit_rows = np.array([offsets[k] + w - prefixes[k] for k, w in picked], np.int64)
            with model.hooks([(name, put_back)]):
                out, rows = model.run_batch([corrupted] * len(group), start_at_layer=layer, resid=starts,
                                            prefixes=prefixes, prefix_kv=prefix_kv, logit_rows=logit_rows,
                                            solo_bits=not reuse)
            logits = ops.to_host(out)
            for k, p in enumerate(prefixes):
                if logit_rows is None:
                    changed = list(range(p, n_pos))
                    scratch[changed] = logits[rows[k]]
                else:
                    changed = [w for kk, w in picked if kk == k]
                    scratch[changed] = logits[[j for j, (kk, _) in enumerate(picked) if kk == k]]
                result[i, start + k] = metric(scratch)
                scratch[changed] = base[changed]
    return result


def _flat(ops: Any, parts: list[Any]) -> Any:
    """Rows of several arrays one after another, on the backend (one part is passed through)."""
    return parts[0] if len(parts) == 1 else ops.concat_rows(parts)


def steering_vector(model: Any, positive: Sequence[int], negative: Sequence[int], layer: int,
                    activation: str = "resid_pre", pos: int | None = -1) -> np.ndarray:
    """A direction ``[d_model]``: the positive prompt's residual minus the negative one's at ``layer``.

    Taken at position ``pos`` of each prompt (the last by default: with prompts like "I love" / "I hate"
    that is where they differ), or averaged over all positions with ``pos=None``.
    """
    name = act_name(activation, layer)
    reads = []
    for ids in (positive, negative):
        _, cache = model.run_with_cache(ids, names_filter=name, stop_at_layer=layer + 1)
        reads.append(cache[name].mean(axis=0) if pos is None else cache[name][pos])
    return (reads[0] - reads[1]).astype(np.float32)


@contextmanager
def steering(model: Any, direction: np.ndarray, layer: int, scale: float = 1.0,
             activation: str = "resid_pre") -> Iterator[None]:
    """Add ``scale * direction`` to the residual stream at ``layer`` for every token while inside.

    Works for ``run_with_hooks`` and for generation alike (prefill and each decode step).
    """
    shift = np.float32(scale) * np.asarray(direction, np.float32)

    def add(act: np.ndarray, hook: HookPoint) -> np.ndarray:
        return act + shift

    with model.hooks([(act_name(activation, layer), add)]):
        yield
