"""Speed of ``device="cpu-exact"`` (llama.cpp's arithmetic bit for bit, numba kernels) next to the default
``device="cpu"`` (BLAS) and llama-cpp-python itself, both models, on the same machine in the same run.

Prefill of a 128-token prompt (pp128) and decode of 128 greedy tokens from a one-token prompt (tg128, end-of-text
banned), as ``rocmforge.cli.bench.measure_speed`` measures them; llama.cpp gets the same token ids. Each
(engine, model) runs in its own subprocess, the engines alternate ``--rounds`` times so a busy spell on a shared
machine hits all of them, and each number is the best over all runs. llama.cpp and the default CPU path run 2
threads; cpu-exact splits its large matmuls over the machine's cores (``rocmforge.exact.threads``). Prints a
Markdown table with the date, CPU and load average for BENCHMARKS.md.

    .venv/bin/python benchmarks/exact_decode.py [--models smollm2-135m gemma3-270m] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ENGINES = ("cpu-exact", "cpu", "llama.cpp")
THREADS = 2


def _prompt_ids(vocab: int, n: int) -> list[int]:
    # the ids measure_speed prefills
    return [int(i) for i in np.random.default_rng(0).integers(min(1000, vocab // 2), min(vocab, 30000), n)]


def run_rocmforge(device: str, name: str, n_prompt: int, n_gen: int, reps: int) -> dict[str, float]:
    import rocmforge
    from rocmforge.cli.bench import measure_speed

    extra = {"n_threads": THREADS} if device == "cpu" else {}
    model = rocmforge.load(name, device=device, n_ctx=n_prompt + n_gen + 8, **extra)
    speed = measure_speed(model, n_prompt=n_prompt, n_gen=n_gen, reps=reps)
    return {"pp": speed["prefill_tok_s"], "tg": speed["decode_tok_s"]}


def run_llama_cpp(name: str, n_prompt: int, n_gen: int, reps: int) -> dict[str, float]:
    from llama_cpp import Llama

    from rocmforge.registry import resolve

    llm = Llama(model_path=str(resolve(name)), n_ctx=n_prompt + n_gen + 8, n_batch=512, n_threads=THREADS,
                verbose=False)
    ids = _prompt_ids(llm.n_vocab(), n_prompt)
    eot = {llm.token_eos()}
    pp, tg = [], []
    for _ in range(reps):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        pp.append(n_prompt / (time.perf_counter() - start))
        llm.reset()
        llm.eval(ids[:1])
        token = int(np.argmax(llm.scores[0]))
        start = time.perf_counter()
        for _ in range(n_gen):
            llm.eval([token])
            scores = llm.scores[llm.n_tokens - 1].copy()
            scores[list(eot)] = -np.inf
            token = int(np.argmax(scores))
        tg.append(n_gen / (time.perf_counter() - start))
    return {"pp": max(pp), "tg": max(tg)}


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--rounds", type=int, default=3, help="subprocess runs of each engine (alternating)")
    parser.add_argument("--reps", type=int, default=2, help="measurements per subprocess (the first warms up)")
    parser.add_argument("--n-prompt", type=int, default=128)
    parser.add_argument("--n-gen", type=int, default=128)
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        engine, name = args.worker
        result = (run_llama_cpp(name, args.n_prompt, args.n_gen, args.reps) if engine == "llama.cpp"
                  else run_rocmforge(engine, name, args.n_prompt, args.n_gen, args.reps))
        print(json.dumps(result))
        return

    started = datetime.now(timezone.utc)
    idle_load = os.getloadavg()[0]
    loads = []
    best: dict[tuple[str, str], dict[str, float]] = {}
    for name in args.models:
        for _ in range(args.rounds):
            for engine in ENGINES:
                out = subprocess.run([sys.executable, __file__, "--worker", engine, name, "--reps", str(args.reps),
                                      "--n-prompt", str(args.n_prompt), "--n-gen", str(args.n_gen)],
                                     capture_output=True, text=True, check=True)
                run = json.loads(out.stdout.strip().splitlines()[-1])
                loads.append(os.getloadavg()[0])
                print(name, engine, run, f"load {loads[-1]:.2f}", file=sys.stderr)
                old = best.setdefault((name, engine), run)
                best[(name, engine)] = {key: max(value, old[key]) for key, value in run.items()}
    pp, tg = f"pp{args.n_prompt}", f"tg{args.n_gen}"
    print(f"{started:%Y-%m-%d %H:%M} UTC, {_cpu_model()}, {os.cpu_count()} cores, 1-minute load average "
          f"{idle_load:.2f} before the run, {min(loads):.2f}-{max(loads):.2f} during it (the run's own processes "
          f"count); best of {args.rounds} processes x {args.reps} runs.\n")
    print(f"| model | engine | {pp} tok/s | {tg} tok/s | {pp} / llama.cpp | {tg} / llama.cpp |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        reference = best[(name, "llama.cpp")]
        for engine in ENGINES:
            speed = best[(name, engine)]
            print(f"| {name} | {engine} | {speed['pp']:.1f} | {speed['tg']:.1f} | {speed['pp'] / reference['pp']:.2f}x "
                  f"| {speed['tg'] / reference['tg']:.2f}x |")


if __name__ == "__main__":
    main()
