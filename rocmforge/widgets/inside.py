"""Inside the model after a generation: attention patterns and the logit lens of the whole sequence.

One ``run_with_cache`` over prompt + generated tokens caches every layer's attention pattern and the residual
stream, so picking another layer or head afterwards costs nothing.

>>> import rocmforge  # doctest: +SKIP
>>> model = rocmforge.load("smollm2-135m")  # doctest: +SKIP
>>> view = look_inside(model, model.tokenize("The capital of France is Paris"))  # doctest: +SKIP
>>> view.pattern(layer=3, head=0).shape, view.lens[-1][2]  # doctest: +SKIP
((7, 7), '.')
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rocmforge.hooks import act_name


@dataclass(frozen=True)
class InsideView:
    """``patterns[layer]`` is ``[head, query, key]``; ``lens`` rows are (stage, token id, text, probability)."""

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
    names = {act_name("pattern", i) for i in range(n_layers)} | {act_name("resid_pre", i) for i in range(n_layers)}
    names.add(act_name("resid_post", n_layers - 1))
    _, cache = model.run_with_cache(list(token_ids), names_filter=lambda name: name in names)
    lens_logits = np.asarray(cache.logit_lens(pos=-1), dtype=np.float64)  # [n_layers + 1, d_vocab]
    probs = np.exp(lens_logits - lens_logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    stages = [f"layer {i} input" for i in range(n_layers)] + ["final"]
    tokenizer = model.tokenizer
    lens = []
    for stage, row in zip(stages, probs):
        top = int(np.argmax(row))
        lens.append((stage, top, tokenizer.token_text(top), float(row[top])))
    patterns = {i: np.asarray(cache["pattern", i]) for i in range(n_layers)}
    labels = [tokenizer.token_text(t) for t in token_ids]
    return InsideView(list(token_ids), labels, patterns, lens)
