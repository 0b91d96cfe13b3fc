"""CPU generation speed: prefill (pp512) and decode (tg128) tok/s and peak RSS, rocmforge vs llama-cpp-python.

Each (engine, model) runs in its own subprocess so peak RSS (``ru_maxrss``) belongs to that engine alone. Both
get the same 512 random token ids for prefill; decode is 128 greedy tokens from a 1-token prompt (as llama-bench's
tg128), end-of-generation tokens banned so every run makes all 128. llama.cpp runs with ``--threads`` (2),
rocmforge with ``--rocmforge-threads`` BLAS threads (2, the same cores; ``rocmforge.load`` defaults to half the
cores, as llama-cpp-python does, because both engines' spin-waiting threads collapse on a busy machine).
The two engines alternate, ``--rounds`` times per model, so a busy spell on a shared machine hits both; each
number is the best over all rounds. Prints a Markdown table and, with ``--write``, replaces the "CPU generation"
section of BENCHMARKS.md. Run it with ``OPENBLAS_CORETYPE`` unset (some machines here set it for an older
OpenBLAS; it forces a slower kernel on current numpy): the table names the BLAS kernel each worker ran.

    env -u OPENBLAS_CORETYPE .venv/bin/python benchmarks/cpu_generate.py --write
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

MODELS = ("smollm2-135m", "gemma3-270m")
ENGINES = ("rocmforge", "rocmforge cpu-exact", "llama.cpp")
N_PROMPT, N_DECODE = 512, 128


def _prompt_ids(vocab: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(0).integers(1000, min(vocab, 30000), N_PROMPT)]


def run_rocmforge(name: str, threads: int, reps: int, device: str = "cpu") -> dict:
    import rocmforge
    from rocmforge.cli.bench import measure_speed

    model = rocmforge.load(name, device=device, n_ctx=1024, n_threads=threads)
    if device == "cpu-exact":
        measure_speed(model, 16, 8, 1)  # compiles (or loads from numba's disk cache) the kernels for these shapes
    speed = measure_speed(model, N_PROMPT, N_DECODE, reps)  # the same prompt ids as _prompt_ids
    return {"pp512": speed["prefill_tok_s"], "tg128": speed["decode_tok_s"]}


def run_llama_cpp(name: str, threads: int, reps: int) -> dict:
    from llama_cpp import Llama

    from rocmforge.registry import resolve

    llm = Llama(model_path=str(resolve(name)), n_ctx=1024, n_batch=512, n_threads=threads, verbose=False)
    ids = _prompt_ids(llm.n_vocab())
    pp, tg = [], []
    for _ in range(reps):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        pp.append(N_PROMPT / (time.perf_counter() - start))
    for _ in range(reps):
        llm.reset()
        llm.eval(ids[:1])
        token = int(np.argmax(llm.scores[0]))
        start = time.perf_counter()
        for _ in range(N_DECODE):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tg.append(N_DECODE / (time.perf_counter() - start))
    return {"pp512": max(pp), "tg128": max(tg)}


def worker(engine: str, name: str, threads: int, reps: int) -> None:
    """Run one engine on one model in this process and print its numbers as JSON."""
    if engine == "llama.cpp":
        result = run_llama_cpp(name, threads, reps)
    else:
        result = run_rocmforge(name, threads, reps, device="cpu-exact" if engine.endswith("cpu-exact") else "cpu")
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if engine == "rocmforge":
        result["blas"] = _blas()
    print(json.dumps(result))


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _blas() -> str:
    from threadpoolctl import threadpool_info

    import numpy  # noqa: F401  (loads the BLAS threadpoolctl inspects)

    info = [i for i in threadpool_info() if i["user_api"] == "blas"]
    return ", ".join(f"{i['internal_api']} {i['version']} ({i.get('architecture', '?')} kernel, "
                     f"{i['num_threads']} thread(s))" for i in info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--rocmforge-threads", type=int, default=2, help="rocmforge BLAS threads")
    parser.add_argument("--reps", type=int, default=2, help="runs of each measurement per process")
    parser.add_argument("--rounds", type=int, default=2, help="times each engine runs (alternating) per model")
    parser.add_argument("--write", action="store_true", help="replace the CPU generation section of BENCHMARKS.md")
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.threads, args.reps)
        return

    rows: dict[tuple[str, str], dict] = {}
    for name in MODELS:
        for _ in range(args.rounds):
            for engine in ENGINES:
                threads = args.rocmforge_threads if engine.startswith("rocmforge") else args.threads
                out = subprocess.run([sys.executable, __file__, "--worker", engine, name, "--threads", str(threads),
                                      "--reps", str(args.reps)], capture_output=True, text=True, check=True)
                run = json.loads(out.stdout.strip().splitlines()[-1])
                print(name, engine, run, f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
                best = rows.setdefault((name, engine), run)
                best.update({key: max(best[key], run[key]) for key in ("pp512", "tg128")},
                            peak_rss_mib=max(best["peak_rss_mib"], run["peak_rss_mib"]))
    table = _markdown(rows, args.threads, args.rocmforge_threads, args.reps * args.rounds)
    print(table)
    if args.write:
        _write_section(table)


def _markdown(rows: dict, threads: int, rocmforge_threads: int, reps: int) -> str:
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "## CPU generation",
        "",
        f"Measured {date.today().isoformat()} by `benchmarks/cpu_generate.py` on {_cpu_model()} "
        f"({os.cpu_count()} cores, {platform.machine()}; load average {load} at the end: the machine was shared), "
        f"llama.cpp {threads} threads, rocmforge {rocmforge_threads} BLAS thread(s), rocmforge's BLAS: "
        f"{rows[MODELS[0], 'rocmforge']['blas']}. "
        "rocmforge (device=\"cpu\") keeps weights dequantized to float32 (one BLAS call per matmul, activations "
        "rounded to 8 bits as llama.cpp does); rocmforge cpu-exact keeps the raw blocks and reproduces llama.cpp's "
        "arithmetic in numba kernels; llama.cpp is llama-cpp-python with its own quantized kernels. pp512: 512-token "
        f"prompt; tg128: 128 greedy tokens from a 1-token prompt; best of {reps} runs (the engines alternating); "
        "peak RSS (the highest seen) of a process that loads the model and runs both.",
        "",
        "| model | engine | pp512 tok/s | tg128 tok/s | peak RSS MiB | pp vs llama.cpp | tg vs llama.cpp |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in MODELS:
        ref = rows[name, "llama.cpp"]
        for engine in ENGINES:
            r = rows[name, engine]
            lines.append(f"| {name} | {engine} | {r['pp512']:.0f} | {r['tg128']:.1f} | {r['peak_rss_mib']:.0f} | "
                         f"{r['pp512'] / ref['pp512']:.2f}x | {r['tg128'] / ref['tg128']:.2f}x |")
    return "\n".join(lines) + "\n"


def _write_section(table: str) -> None:
    path = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find("## CPU generation")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + table + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + table
    path.write_text(text)


if __name__ == "__main__":
    main()
