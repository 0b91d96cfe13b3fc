"""HTML for the panel's views. Pure functions of the data, so tests can read what a user would see.

>>> html = token_html([TokenStep(5, " hi", 0.5, ((5, " hi", 0.5), (7, " yo", 0.25)))])
>>> 'title="p=0.5000' in html and "&#x27; yo&#x27; 0.2500" in html
True
"""
from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np

from rocmforge.widgets.record import GenerationResult, TokenStep

MAX_HEATMAP_POSITIONS = 48  # a wider table stops being readable; the view shows the last positions


def _shown(text: str) -> str:
    """A token's text made visible: spaces as they are, newlines as ↵, escaped for HTML."""
    return html.escape(text.replace("\n", "↵\n"))


def probability_colour(p: float) -> str:
    """Red (unlikely) through yellow to green (likely): hue 0..120 degrees."""
    return f"hsl({120 * min(max(p, 0.0), 1.0):.0f}, 75%, 82%)"


def alternatives_title(step: TokenStep) -> str:
    lines = [f"p={step.probability:.4f}"] + [f"{text!r} {p:.4f}" for _, text, p in step.alternatives]
    return "\n".join(lines)


def token_html(tokens: Sequence[TokenStep]) -> str:
    """Each token on a background coloured by its probability; hovering shows the top alternatives."""
    spans = [f'<span class="rf-token" data-index="{i}" title="{html.escape(alternatives_title(step))}" '
             f'style="background:{probability_colour(step.probability)};white-space:pre-wrap;'
             f'border-radius:3px;padding:0 1px">{_shown(step.text)}</span>'
             for i, step in enumerate(tokens)]
    return '<div class="rf-tokens" style="line-height:1.9;font-family:monospace">' + "".join(spans) + "</div>"


def alternatives_html(step: TokenStep, index: int) -> str:
    """The top alternatives of one step as a table, the drawn token in bold."""
    rows = "".join(
        f"<tr><td>{'<b>' if t == step.token_id else ''}{_shown(repr(text))}{'</b>' if t == step.token_id else ''}"
        f"</td><td>{t}</td><td>{p:.4f}</td></tr>" for t, text, p in step.alternatives)
    return (f"<div><b>token {index}</b>: {_shown(repr(step.text))} drawn with p={step.probability:.4f}"
            f"<table><tr><th>alternative</th><th>id</th><th>p</th></tr>{rows}</table></div>")


def stats_html(result: GenerationResult) -> str:
    s = result.stats
    return (f"<span class='rf-stats'>{int(s['n_generated'])} tokens · {s['tokens_per_s']:.1f} tokens/s · "
            f"time to first token {s['ttft_s']:.2f} s · prompt {int(s['n_prompt'])} tokens · "
            f"finish: {result.finish_reason}</span>")


def passages_html(passages: Sequence[Any], cited: Sequence[int]) -> str:
    """Retrieved passages with source and score; the ones the answer cites are marked ✔."""
    if not passages:
        return "<i>no passages retrieved</i>"
    items = []
    for i, hit in enumerate(passages):
        mark = "✔ cited" if i in cited else ""
        border = "#2a7" if i in cited else "#ccc"
        items.append(f'<div class="rf-passage" style="border-left:4px solid {border};padding:2px 6px;margin:4px 0">'
                     f"<b>[{i + 1}]</b> {html.escape(hit.source)} · score {hit.score:.4f} <b>{mark}</b><br>"
                     f"<small>{html.escape(hit.text[:400])}</small></div>")
    return "".join(items)


def logit_lens_html(rows: Sequence[tuple[str, int, str, float]]) -> str:
    """Rows of (stage, token id, token text, probability): the top token each layer's residual decodes to."""
    body = "".join(f"<tr><td>{html.escape(stage)}</td><td>{_shown(repr(text))}</td><td>{t}</td><td>{p:.4f}</td></tr>"
                   for stage, t, text, p in rows)
    return ('<table class="rf-logit-lens" style="white-space:nowrap">'
            f"<tr><th>residual</th><th>top token</th><th>id</th><th>p</th></tr>{body}</table>")


def attention_html(pattern: np.ndarray, labels: Sequence[str], title: str) -> str:
    """A ``[query, key]`` attention pattern of the last query positions as a shaded table.

    ``labels`` name every position; the table shows the last ``MAX_HEATMAP_POSITIONS`` queries and keys (the
    weights of earlier keys are left out, so a shown row can sum to less than 1; each cell's title is its weight).
    Shading is relative to the largest shown weight: much of the weight often sits on the first token, which
    would otherwise leave the rest of the table blank.
    """
    n = len(labels)
    shown = min(n, MAX_HEATMAP_POSITIONS, pattern.shape[0])
    pattern, labels = pattern[-shown:, n - shown:], [_shown(repr(t)) for t in labels[n - shown:]]
    scale = float(pattern.max()) if pattern.size and pattern.max() > 0 else 1.0
    head = "".join(f'<th style="writing-mode:vertical-rl;font-weight:normal">{t}</th>' for t in labels)
    rows = []
    for q, label in enumerate(labels):
        cells = "".join(f'<td title="{w:.4f}" style="background:rgba(30,90,200,{w / scale:.3f});width:10px"></td>'
                        for w in pattern[q])
        rows.append(f'<tr><th style="text-align:right;font-weight:normal">{label}</th>{cells}</tr>')
    note = (f" (last {shown} of {n} positions)" if shown < n else "") + f" · darkest = {scale:.3f}"
    return (f'<div class="rf-attention"><b>{html.escape(title)}</b>{note}<table style="border-collapse:collapse;'
            f'font-family:monospace;font-size:10px"><tr><th></th>{head}</tr>{"".join(rows)}</table></div>')
