"""Batch generation and batch scoring over a dataset (``rocmforge batch``).

- ``generate``: each text is a prompt; the result is its continuation (``Model.generate``; greedy by default).
- ``score``: each text is scored as a whole: the sum of log p(token | tokens before it) over every token after the
  first (``Model.forward`` logits, log-softmax in float64), and the number of tokens scored.

Results are JSON lines in input order: ``{"index", "text", "completion"}`` or ``{"index", "text", "logprob",
"tokens"}``. Each row depends only on its own text (so the rows can be split between workers).

>>> model = rocmforge.load("smollm2-135m", device="cpu")  # doctest: +SKIP
>>> run_batch(model, "score", ["The cat sat on the mat."])[0]["tokens"]  # doctest: +SKIP
6
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("generate", "score")


def run_batch(model: Any, task: str, texts: Sequence[str], max_new_tokens: int = 64, start: int = 0,
              **sampling: Any) -> list[dict[str, Any]]:
    """Results for ``texts`` (rows numbered from ``start``) on ``model``, in this process."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    rows = []
    for i, text in enumerate(texts, start=start):
        if task == "generate":
            sampling = {"temperature": 0.0, **sampling}
            rows.append({"index": i, "text": text, "completion": model.generate(text, max_new_tokens, **sampling)})
        else:
            ids = model.tokenize(text)
            logits = model.forward(ids)[:-1].astype(np.float64)
            top = logits.max(axis=1, keepdims=True)
            logprobs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
            picked = logprobs[np.arange(len(ids) - 1), ids[1:]]
            rows.append({"index": i, "text": text, "logprob": float(picked.sum()), "tokens": len(ids) - 1})
    return rows


def read_texts(path: str | os.PathLike) -> list[str]:
    """One text per line (blank lines skipped); a ``.jsonl`` file gives each line's ``"text"``."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if str(path).endswith(".jsonl"):
        return [json.loads(line)["text"] for line in lines if line.strip()]
    return [line for line in lines if line.strip()]


def write_results(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """JSON lines, written to ``path.partial`` and renamed (a reader never sees half a file)."""
    tmp = Path(str(path) + ".partial")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    os.replace(tmp, path)
