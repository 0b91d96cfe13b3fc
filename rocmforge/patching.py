"""Activation patching and steering: which activations carry the difference between two prompts.

Activation patching (Meng et al., 2022; Wang et al., 2022) runs a *corrupted* prompt, puts one
activation back from the *clean* run, and measures how much of the clean behaviour returns. Done
for every (layer, position) of the residual stream, or every (layer, head) of the attention
output ``z``, it maps where the information flows. Steering (Turner et al., 2023, "ActAdd") adds
a direction to the residual stream at one layer while the model generates.

The model is a ``rocmforge.model.Model`` (its ``run_with_cache``, ``hooks`` and ``forward_many``).

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

    >>> import numpy as np
    >>> logit_diff(2, 0)(np.array([[0.0, 0.0, 0.0], [1.0, 5.0, 3.0]]))
    2.0
    """
    def metric(logits: np.ndarray) -> float:
        return float(logits[pos, correct] - logits[pos, wrong])
    return metric


def patch_residual(model: Any, clean: Sequence[int], corrupted: Sequence[int], metric: Metric, *,
                   activation: str = "resid_pre", layers: Sequence[int] | None = None,
                   positions: Sequence[int] | None = None, max_batch: int = 1) -> np.ndarray:
    """Metric of the corrupted run with the clean residual put back at one (layer, position).

    Returns ``[len(layers), len(positions)]`` (all layers and positions by default). Entry
    ``[i, j]`` patches ``blocks.{layers[i]}.hook_{activation}`` at position ``positions[j]``;
    ``activation`` is any ``[pos, d_model]`` point: resid_pre|mid|post, attn_out, mlp_out.

    Each patched run starts at the patched layer from the corrupted run's residual (the blocks before
    it would compute exactly that). ``max_batch`` is how many patched runs share one forward: 1 (the
    default) keeps each bit-comparable with the clean and corrupted runs; more is faster but, on the CPU
    backend, a row's bits depend on the batch around it (OpenBLAS picks kernels by row count, and
    llama.cpp-style 8-bit activation rounding amplifies last-bit differences): on SmolLM2 that moved a
    logit difference by up to 4%.
    """
    if activation not in _RESIDUAL:
        raise ValueError(f"residual patching works on {', '.join(_RESIDUAL)}, not {activation!r}")
    positions = list(range(len(clean))) if positions is None else list(positions)

    def put_back(act: np.ndarray, clean_act: np.ndarray, variant: int, rows: slice) -> None:
        pos = positions[variant] % len(clean)
        act[rows.start + pos] = clean_act[pos]

    return _patch(model, clean, corrupted, metric, activation, layers, len(positions), put_back, max_batch)


def patch_heads(model: Any, clean: Sequence[int], corrupted: Sequence[int], metric: Metric, *,
                activation: str = "z", layers: Sequence[int] | None = None,
                heads: Sequence[int] | None = None, max_batch: int = 1) -> np.ndarray:
    """Metric of the corrupted run with one head's clean activation put back at every position.

    Returns ``[len(layers), len(heads)]``. ``activation`` is ``z`` (the head's output, default),
    ``q``/``rot_q`` (query heads) or ``k``/``rot_k``/``v`` (key-value heads, fewer with GQA).
    ``max_batch`` as in ``patch_residual``.
    """
    if activation not in _PER_HEAD:
        raise ValueError(f"per-head patching works on {', '.join(_PER_HEAD)}, not {activation!r}")
    if heads is None:
        heads = range(model.cfg.n_kv_heads if activation in ("k", "rot_k", "v") else model.cfg.n_heads)
    heads = list(heads)

    def put_back(act: np.ndarray, clean_act: np.ndarray, variant: int, rows: slice) -> None:
        act[rows, heads[variant]] = clean_act[:, heads[variant]]

    return _patch(model, clean, corrupted, metric, activation, layers, len(heads), put_back, max_batch)


def _patch(model: Any, clean: Sequence[int], corrupted: Sequence[int], metric: Metric, activation: str,
           layers: Sequence[int] | None, n_variants: int,
           put_back: Callable[[np.ndarray, np.ndarray, int, slice], None], max_batch: int) -> np.ndarray:
    """For each layer: run ``n_variants`` patched copies of the corrupted prompt, ``max_batch`` per forward;
    ``put_back(act, clean_act, variant, rows)`` copies clean values into the rows of each copy."""
    if len(clean) != len(corrupted):
        raise ValueError(f"clean and corrupted prompts must have the same number of tokens "
                         f"({len(clean)} vs {len(corrupted)}) so positions line up")
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    names = [act_name(activation, layer) for layer in layers]
    _, clean_cache = model.run_with_cache(clean, names_filter=names)
    starts = [act_name("resid_pre", layer) for layer in layers]
    _, corrupted_cache = model.run_with_cache(corrupted, names_filter=starts, stop_at_layer=max(layers) + 1)
    n_pos = len(clean)
    result = np.empty((len(layers), n_variants), np.float64)
    for i, (layer, name) in enumerate(zip(layers, names)):
        for first in range(0, n_variants, max_batch):
            variants = range(first, min(first + max_batch, n_variants))

            def patch(act: np.ndarray, hook: HookPoint) -> np.ndarray:
                act = act.copy()
                for k, variant in enumerate(variants):
                    put_back(act, clean_cache[hook.name], variant, slice(k * n_pos, (k + 1) * n_pos))
                return act

            resid = np.tile(corrupted_cache[starts[i]], (len(variants), 1))
            with model.hooks([(name, patch)]):
                logits = model.forward_many([corrupted] * len(variants), start_at_layer=layer, resid=resid)
            result[i, first:first + len(variants)] = [metric(row) for row in logits]
    return result


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
