"""What the generation panel adds per token: recording each step's distribution and top-5 alternatives.

    .venv/bin/python -m benchmarks.widgets_panel                 # SmolLM2, 32 tokens, 3 repeats
    .venv/bin/python -m benchmarks.widgets_panel --tokens 64 --repeats 5

Two measurements in one run, on the numpy CPU path:

* the sampling step alone, on real logits of the model: ``Sampler.sample`` (what ``Model.generate`` does per
  token) against ``RecordingSampler.sample`` (distribution + draw + top-5 alternatives + their texts);
* end to end: ``Model.generate`` against ``record_generation`` (the panel's loop, without widgets), same prompt,
  settings and seed, in alternating order; the texts must be identical.

CPU time (process_time) is reported beside wall time: the machines this runs on are shared.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time

import rocmforge
from rocmforge.sampler import Sampler, SamplingParams, top_alternatives
from rocmforge.widgets.record import RecordingSampler, record_generation

PROMPT = "The history of the printing press begins"
SETTINGS = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1, seed=5)


def time_sampling_step(model, repeats: int = 200) -> tuple[float, float]:
    """Median microseconds per call of Sampler.sample and RecordingSampler.sample on the prompt's logits."""
    ids = model.tokenize(PROMPT)
    logits = model.forward(ids)[-1]
    params = SamplingParams(**SETTINGS)
    plain = Sampler(params)

    def record(token: int, probs) -> None:  # what record_generation does with each step
        [model.tokenizer.token_text(t) for t, _ in top_alternatives(probs, 5)]

    recording = RecordingSampler(params, record, threading.Event())
    results = []
    for sampler in (plain, recording):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            sampler.sample(logits, ids)
            times.append(time.perf_counter() - start)
        results.append(statistics.median(times) * 1e6)
    return results[0], results[1]


def time_end_to_end(model, n_tokens: int, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """(wall s, CPU s) per run of Model.generate and of record_generation."""
    ids = model.tokenize(PROMPT)
    runs: dict[str, list[tuple[float, float]]] = {"generate": [], "panel": []}
    texts = set()
    for _ in range(repeats):
        for name in ("generate", "panel"):
            wall, cpu = time.perf_counter(), time.process_time()
            if name == "generate":
                text = model.generate(PROMPT, max_new_tokens=n_tokens, **SETTINGS)
            else:
                text = record_generation(model, ids, SamplingParams(**SETTINGS), n_tokens).text
            runs[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            texts.add(text)
    assert len(texts) == 1, "the panel's loop produced a different text from Model.generate"
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = rocmforge.load(args.model, device="cpu")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    plain_us, recording_us = time_sampling_step(model)
    print(f"sampling step on {model.cfg.vocab_size}-token logits: Sampler.sample {plain_us:.0f} µs, "
          f"RecordingSampler.sample {recording_us:.0f} µs (+{recording_us - plain_us:.0f} µs per token)")
    runs = time_end_to_end(model, args.tokens, args.repeats)
    for name, label in (("generate", "Model.generate"), ("panel", "record_generation (panel loop)")):
        wall = statistics.median(w for w, _ in runs[name])
        cpu = statistics.median(c for _, c in runs[name])
        print(f"{label:32} {args.tokens} tokens: median {wall:.2f} s wall ({args.tokens / wall:.1f} tok/s), "
              f"{cpu:.2f} s CPU ({args.tokens / cpu:.1f} tok/CPU-s)")


if __name__ == "__main__":
    main()
