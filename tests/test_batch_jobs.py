"""Batch generation and scoring (``rocmforge batch``): scores are the model's log-likelihood, completions its
greedy text; Ray Data with 2 CPU actors writes the same results as one process."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rocmforge.batch_jobs import on_ray, run_batch
from rocmforge.cli.main import cli
from rocmforge.model import load

TEXTS = ["Once upon a time, a lighthouse keeper", "The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def model(smollm2_path):
    return load(smollm2_path, device="cpu", n_ctx=256, n_parallel=1)


def test_scores_are_the_models_log_likelihood(model) -> None:
    (row,) = run_batch(model, "score", ["The cat sat on the mat."])
    ids = model.tokenize("The cat sat on the mat.")
    logits = model.forward(ids).astype(np.float64)
    by_hand = sum(logits[i, ids[i + 1]] - np.log(np.exp(logits[i]).sum()) for i in range(len(ids) - 1))
    assert row["tokens"] == len(ids) - 1 and row["logprob"] == pytest.approx(by_hand, rel=1e-9)
    shuffled = run_batch(model, "score", ["mat the sat. cat on The"])[0]
    assert shuffled["logprob"] < row["logprob"]  # the model prefers the sentence to its words shuffled


def test_the_batch_command_writes_greedy_completions_in_order(model, smollm2_path, tmp_path: Path) -> None:
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "completions.jsonl"
    result = CliRunner().invoke(cli, ["batch", "generate", str(source), "--out", str(out), "-m", str(smollm2_path),
                                      "--device", "cpu", "--n-ctx", "256", "--max-tokens", "6"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and [r["text"] for r in rows] == TEXTS
    assert [r["completion"] for r in rows] == [model.generate(t, 6, temperature=0.0) for t in TEXTS]


@pytest.mark.parametrize("task", ["generate", "score"])
def test_ray_data_with_two_actors_equals_one_process(ray_cluster, model, smollm2_path, task) -> None:
    texts = [*TEXTS, "Bees dance to tell the hive", "In 1969, the first humans", "A recipe for bread: flour,"]
    local = run_batch(model, task, texts, max_new_tokens=6)
    remote = on_ray(task, str(smollm2_path), texts, workers=2, device="cpu", n_ctx=256, max_new_tokens=6,
                    batch_size=2)
    assert remote == local


def test_the_batch_command_on_ray_writes_the_same_file(ray_cluster, smollm2_path, tmp_path: Path) -> None:
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n")
    common = ["batch", "score", str(source), "-m", str(smollm2_path), "--device", "cpu", "--n-ctx", "256"]
    for out, extra in (("one.jsonl", []), ("ray.jsonl", ["--workers", "2"])):
        result = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / out), *extra])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "ray.jsonl").read_bytes()
