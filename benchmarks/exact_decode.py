"""Speed of ``device="cpu-exact"`` (llama.cpp's arithmetic bit for bit, numba kernels) next to the default
``device="cpu"`` (BLAS), same process, same machine, alternating so a busy spell on a shared machine hits both.

Prefill of a 128-token prompt and decode of 128 greedy tokens (``rocmforge.cli.bench.measure_speed``), best of
``--reps``; prints one Markdown row per device for BENCHMARKS.md.

    .venv/bin/python benchmarks/exact_decode.py [--model smollm2-135m] [--reps 2]
"""
from __future__ import annotations

import argparse
import platform
from datetime import date

import rocmforge
from rocmforge.cli.bench import measure_speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--n-prompt", type=int, default=128)
    parser.add_argument("--n-gen", type=int, default=128)
    args = parser.parse_args()
    models = {device: rocmforge.load(args.model, device=device, n_ctx=512) for device in ("cpu-exact", "cpu")}
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.reps):
        for device, model in models.items():
            speed = measure_speed(model, n_prompt=args.n_prompt, n_gen=args.n_gen, reps=1)
            old = best.setdefault(device, speed)
            best[device] = {k: max(v, old[k]) for k, v in speed.items()}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine())
    print(f"| device | model | pp{args.n_prompt} tok/s | tg{args.n_gen} tok/s | machine | date |")
    print("|---|---|---|---|---|---|")
    for device, speed in best.items():
        print(f"| {device} | {args.model} | {speed['prefill_tok_s']:.1f} | {speed['decode_tok_s']:.1f} | {cpu}, "
              f"2 cores | {date.today()} |")


if __name__ == "__main__":
    main()
