"""Batch generation and batch scoring over a dataset: in this process, or on Ray Data with one actor per GPU (or
per CPU worker), writing the same results.

- ``generate``: each text is a prompt; the result is its continuation (``Model.generate``; greedy by default).
- ``score``: each text is scored as a whole: the sum of log p(token | tokens before it) over every token after the
  first (``Model.forward`` logits, log-softmax in float64), and the number of tokens scored.

Results are JSON lines in input order: ``{"index", "text", "completion"}`` or ``{"index", "text", "logprob",
"tokens"}``. Each row depends only on its own text, so how rows are split between actors changes nothing.

>>> model = rocmforge.load("smollm2-135m", device="cpu")  # doctest: +SKIP
>>> run_batch(model, "score", ["The cat sat on the mat."])[0]["tokens"]  # doctest: +SKIP
6
>>> on_ray("generate", "smollm2-135m", ["Once upon a time"], workers=2)  # doctest: +SKIP
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


class BatchWorker:
    """A Ray Data actor: loads the model once, then answers batches of rows (``index``, ``text``)."""

    def __init__(self, model: str, task: str, device: str, n_ctx: int, max_new_tokens: int,
                 sampling: dict[str, Any]):
        from rocmforge.model import load

        self.model = load(model, device=device, n_ctx=n_ctx, n_parallel=1)
        self.task, self.max_new_tokens, self.sampling = task, max_new_tokens, sampling

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [run_batch(self.model, self.task, [str(text)], self.max_new_tokens, int(index), **self.sampling)[0]
                for index, text in zip(batch["index"], batch["text"])]
        return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


def on_ray(task: str, model: str, texts: Sequence[str], workers: int, *, device: str = "auto", n_ctx: int = 2048,
           max_new_tokens: int = 64, batch_size: int = 8, **sampling: Any) -> list[dict[str, Any]]:
    """``run_batch`` on Ray Data: ``map_batches`` over ``workers`` actors, each holding one model.

    Actors and Ray as ``ray_actor_options`` says.
    """
    import ray

    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    options = ray_actor_options(device, workers)
    dataset = ray.data.from_items([{"index": i, "text": t} for i, t in enumerate(texts)])
    results = dataset.map_batches(
        BatchWorker, batch_size=batch_size, **options,
        fn_constructor_kwargs={"model": model, "task": task, "device": device, "n_ctx": n_ctx,
                               "max_new_tokens": max_new_tokens, "sampling": sampling})
    rows = sorted(results.take_all(), key=lambda row: row["index"])
    return [{key: (value.item() if hasattr(value, "item") else value) for key, value in row.items()} for row in rows]


def ray_actor_options(device: str, workers: int) -> dict[str, Any]:
    """``map_batches`` options for ``workers`` model actors: one GPU each when the cluster has one for each worker
    (and ``device`` allows it), else one CPU each. Starts Ray here (locally) unless ``ray.init`` already ran."""
    import ray

    from rocmforge.ray_start import start_ray

    start_ray()
    on_gpu = device not in ("cpu", "cpu-exact") and ray.cluster_resources().get("GPU", 0) >= workers
    return {"concurrency": workers, "num_gpus": 1 if on_gpu else 0, "num_cpus": 1}


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
