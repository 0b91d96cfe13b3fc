"""Inside the model after a generation: attention patterns and the logit lens of the whole sequence.

One forward over prompt + generated tokens keeps every layer's attention pattern and the residual stream, so
picking another layer or head afterwards costs nothing. Of each pattern only the last ``MAX_HEATMAP_POSITIONS``
query positions are kept (with all their keys): that is what the heatmap shows, and a full ``[head, n, n]`` pattern
for every layer of a long chat prompt would take gigabytes.

>>> import rocmforge  # doctest: +SKIP
>>> model = rocmforge.load("smollm2-135m")  # doctest: +SKIP
>>> view = look_inside(model, model.tokenize("The capital of France is Paris"))  # doctest: +SKIP
>>> view.pattern(layer=3, head=0).shape  # [query, key]  # doctest: +SKIP
(7, 7)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rocmforge.hooks import HookPoint, act_name
from rocmforge.widgets.render import MAX_HEATMAP_POSITIONS


@dataclass(frozen=True)
class InsideView:
    """``patterns[layer]`` is ``[head, query, key]`` for the last ``query`` positions and every key;
    ``lens`` rows are (stage, token id, text, probability) of the top token at the last position."""

    token_ids: list[int]
    labels: list[str]
    patterns: dict[int, np.ndarray]
    lens: list[tuple[str, int, str, float]]

    @property
    def n_layers(self) -> int:
        return len(self.patterns)

    @property
    def n_heads(self) -> int:
        return self.patterns[0].shape[0]

    def pattern(self, layer: int, head: int) -> np.ndarray:
        return self.patterns[layer][head]


def supports_hooks(model: Any) -> bool:
    return callable(getattr(model, "run_with_cache", None))


def look_inside(model: Any, token_ids: Sequence[int]) -> InsideView:
    """Attention pattern of every layer and the top logit-lens token per layer at the last position."""
    n_layers = model.cfg.n_layers
    patterns: dict[int, np.ndarray] = {}

    def keep_last_rows(pattern: np.ndarray, hook: HookPoint) -> None:
        patterns[hook.layer] = np.array(pattern[:, -MAX_HEATMAP_POSITIONS:, :], copy=True)

    pattern_names = {act_name("pattern", i) for i in range(n_layers)}
    resid_names = {act_name("resid_pre", i) for i in range(n_layers)} | {act_name("resid_post", n_layers - 1)}
    with model.hooks([(lambda name: name in pattern_names, keep_last_rows)]):
        _, cache = model.run_with_cache(list(token_ids), names_filter=lambda name: name in resid_names)
    lens_logits = np.asarray(cache.logit_lens(pos=-1), dtype=np.float64)  # [n_layers + 1, d_vocab]
    probs = np.exp(lens_logits - lens_logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    stages = [f"layer {i} input" for i in range(n_layers)] + ["final"]
    tokenizer = model.tokenizer
    lens = []
    for stage, row in zip(stages, probs):
        top = int(np.argmax(row))
        lens.append((stage, top, tokenizer.token_text(top), float(row[top])))
    labels = [tokenizer.token_text(t) for t in token_ids]
    return InsideView(list(token_ids), labels, patterns, lens)
