"""CPU generation speed: prefill (pp512) and decode (tg128) tok/s and peak RSS of rocmforge's numpy path
(``device="cpu"``), its llama.cpp-exact path (``device="cpu-exact"``) and llama-cpp-python, same machine, same run.

Each (engine, model) runs in its own subprocess so peak RSS (``ru_maxrss``) belongs to that engine alone. All get
the same ``--n-prompt`` (512) random token ids for prefill; decode is 128 greedy tokens from a 1-token prompt (as
llama-bench's tg128), rocmforge's with end-of-generation tokens banned so every run makes all 128 (llama.cpp's loop
evaluates every token it is given). llama.cpp runs with ``--threads`` (2), rocmforge with ``--rocmforge-threads``
BLAS threads (2, the same cores; ``rocmforge.load`` defaults to half the cores, as llama-cpp-python does, because
both engines' spin-waiting threads collapse on a busy machine); cpu-exact splits its large calls over
``--rocmforge-threads`` numba threads itself (``rocmforge.exact.threads``). The engines alternate, ``--rounds``
times per model, so a busy spell on a shared machine hits all of them; each number is the best over all rounds.
Prints a Markdown table and, with ``--write``, replaces the whole "CPU generation" section of BENCHMARKS.md (notes
included). Run it with ``OPENBLAS_CORETYPE`` unset (some machines here set it for an older OpenBLAS; it forces a
slower kernel on current numpy): the table names the BLAS kernel each worker ran.

The peer is the llama-cpp-python the venv imports, or ``--llama-cpp DIR``: another build of it installed with
``pip install --target DIR`` (e.g. one built for this CPU without AMX, whose kernels crash here); the table names
the peer's CPU features (``llama_print_system_info``). ``--engines`` picks the engines to run. ``--cpu-time`` times
each engine by its process's CPU time instead of wall time: with ``--threads 1 --rocmforge-threads 1`` the steadier
measure on a machine other jobs keep busy.

    env -u OPENBLAS_CORETYPE .venv/bin/python benchmarks/cpu_generate.py [--n-prompt 128] [--models gemma3-270m]
        [--engines "rocmforge cpu-exact" llama.cpp] [--llama-cpp /tmp/llama_avx512]
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
from collections.abc import Callable
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np

MODELS = ("smollm2-135m", "gemma3-270m")
ENGINES = ("rocmforge", "rocmforge cpu-exact", "llama.cpp")
N_DECODE = 128


def _prompt_ids(vocab: int, n_prompt: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(0).integers(1000, min(vocab, 30000), n_prompt)]


def run_rocmforge(name: str, threads: int, reps: int, n_prompt: int, device: str = "cpu",
                  clock: Callable[[], float] = time.perf_counter) -> dict:
    import rocmforge
    from rocmforge.cli.bench import measure_speed

    if device == "cpu-exact":  # its kernels split over numba's threads (rocmforge.exact.threads), not BLAS's
        import numba

        numba.set_num_threads(threads)
    model = rocmforge.load(name, device=device, n_ctx=max(1024, n_prompt + 8), n_threads=threads)
    if device == "cpu-exact":
        measure_speed(model, 16, 8, 1)  # compiles (or loads from numba's disk cache) the kernels for these shapes
    speed = measure_speed(model, n_prompt, N_DECODE, reps, clock)  # the same prompt ids as _prompt_ids
    return {"pp": speed["prefill_tok_s"], "tg": speed["decode_tok_s"]}


def run_llama_cpp(name: str, threads: int, reps: int, n_prompt: int,
                  clock: Callable[[], float] = time.perf_counter) -> dict:
    import llama_cpp
    from llama_cpp import Llama

    from rocmforge.registry import resolve

    llm = Llama(model_path=str(resolve(name)), n_ctx=max(1024, n_prompt + 8), n_batch=512, n_threads=threads,
                n_threads_batch=threads,  # else prefill takes every core whatever --threads says
                verbose=False)
    ids = _prompt_ids(llm.n_vocab(), n_prompt)
    pp, tg = [], []
    for _ in range(reps):
        llm.reset()
        start = clock()
        llm.eval(ids)
        pp.append(n_prompt / (clock() - start))
    for _ in range(reps):
        llm.reset()
        llm.eval(ids[:1])
        token = int(np.argmax(llm.scores[0]))
        start = clock()
        for _ in range(N_DECODE):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tg.append(N_DECODE / (clock() - start))
    features = llama_cpp.llama_print_system_info().decode().replace("CPU :", "").split("|")
    return {"pp": max(pp), "tg": max(tg),
            "build": " ".join(f.split("=")[0].strip() for f in features if f.strip().endswith("= 1"))}


def worker(engine: str, name: str, threads: int, reps: int, n_prompt: int, cpu_time: bool = False) -> None:
    """Run one engine on one model in this process and print its numbers as JSON."""
    clock = time.process_time if cpu_time else time.perf_counter
    if engine == "llama.cpp":
        result = run_llama_cpp(name, threads, reps, n_prompt, clock)
    else:
        device = "cpu-exact" if engine.endswith("cpu-exact") else "cpu"
        result = run_rocmforge(name, threads, reps, n_prompt, device=device, clock=clock)
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
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--n-prompt", type=int, default=512, help="prefill prompt length (the pp column)")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--llama-cpp", type=Path, help="a llama-cpp-python installed with pip --target DIR (the peer)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by this process's CPU time, not wall time (with --threads 1: steadier on a busy "
                             "machine, where a waiting thread's time does not count)")
    parser.add_argument("--write", action="store_true", help="replace the CPU generation section of BENCHMARKS.md")
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.threads, args.reps, args.n_prompt, args.cpu_time)
        return
    if "llama.cpp" not in args.engines:
        parser.error("--engines needs llama.cpp: every ratio is against it")

    rows: dict[tuple[str, str], dict] = {}
    peer_env = dict(os.environ)
    if args.llama_cpp:
        peer_env["PYTHONPATH"] = os.pathsep.join([str(args.llama_cpp), *filter(None, [os.environ.get("PYTHONPATH")])])
        if (args.llama_cpp / "lib").is_dir():  # libraries beside the package rather than in it
            peer_env["LLAMA_CPP_LIB_PATH"] = str(args.llama_cpp / "lib")
    for name in args.models:
        for _ in range(args.rounds):
            for engine in args.engines:
                threads = args.rocmforge_threads if engine.startswith("rocmforge") else args.threads
                out = subprocess.run([sys.executable, __file__, "--worker", engine, name, "--threads", str(threads),
                                      "--reps", str(args.reps), "--n-prompt", str(args.n_prompt),
                                      *(["--cpu-time"] if args.cpu_time else [])],
                                     capture_output=True, text=True, check=True,
                                     env=peer_env if engine == "llama.cpp" else None)
                run = json.loads(out.stdout.strip().splitlines()[-1])
                print(name, engine, run, f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
                best = rows.setdefault((name, engine), run)
                best.update({key: max(best[key], run[key]) for key in ("pp", "tg")},
                            peak_rss_mib=max(best["peak_rss_mib"], run["peak_rss_mib"]))
    table = _markdown(rows, args.models, args.engines, args.n_prompt, args.threads, args.rocmforge_threads,
                      args.reps * args.rounds, args.cpu_time)
    print(table)
    if args.write:
        _write_section(table)


def _markdown(rows: dict, models: list[str], engines: list[str], n_prompt: int, threads: int, rocmforge_threads: int,
              reps: int, cpu_time: bool = False) -> str:
    pp, tg = f"pp{n_prompt}", f"tg{N_DECODE}"
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    blas = rows[models[0], "rocmforge"]["blas"] if "rocmforge" in engines else "not run"
    lines = [
        "## CPU generation",
        "",
        f"Measured {date.today().isoformat()} by `benchmarks/cpu_generate.py` on {_cpu_model()} "
        f"({os.cpu_count()} cores, {platform.machine()}; load average {load} at the end: the machine was shared), "
        f"llama.cpp {threads} threads, rocmforge {rocmforge_threads} BLAS thread(s), rocmforge's BLAS: "
        f"{blas}; llama.cpp built with {rows[models[0], 'llama.cpp']['build']}; "
        f"finished {datetime.now(timezone.utc):%H:%M} UTC. "
        "rocmforge (device=\"cpu\") keeps weights dequantized to float32 (one BLAS call per matmul, activations "
        "rounded to 8 bits as llama.cpp does); rocmforge cpu-exact keeps the raw blocks and reproduces llama.cpp's "
        f"arithmetic in numba kernels; llama.cpp is llama-cpp-python with its own quantized kernels. {pp}: "
        f"{n_prompt}-token prompt; {tg}: {N_DECODE} greedy tokens from a 1-token prompt; best of {reps} runs (the "
        "engines alternating); "
        f"{'tokens per second of CPU time (process_time); ' if cpu_time else ''}"
        "peak RSS (the highest seen) of a process that loads the model and runs both.",
        "",
        f"| model | engine | {pp} tok/s | {tg} tok/s | peak RSS MiB | pp vs llama.cpp | tg vs llama.cpp "
        "| RSS vs llama.cpp |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in models:
        ref = rows[name, "llama.cpp"]
        for engine in engines:
            r = rows[name, engine]
            lines.append(f"| {name} | {engine} | {r['pp']:.0f} | {r['tg']:.1f} | {r['peak_rss_mib']:.0f} | "
                         f"{r['pp'] / ref['pp']:.2f}x | {r['tg'] / ref['tg']:.2f}x | "
                         f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x |")
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
