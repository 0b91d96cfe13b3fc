"""Tokenizer speed: build time from GGUF metadata, and tokenizing 1 MB of English text against
llama-cpp-python's tokenizer (llama.cpp) in the same run, checking the ids are identical.

    python benchmarks/tokenizer_speed.py [--mb 1.0] [--models smollm2-135m gemma3-270m]

The English text is the docstrings of Python's standard library modules, repeated to the size asked for.
"""
from __future__ import annotations

import argparse
import importlib
import platform
import statistics
import sys
import time
import warnings

import llama_cpp

from rocmforge.gguf_file import GGUFFile
from rocmforge.registry import resolve
from rocmforge.tokenizer import Tokenizer

STDLIB_MODULES = ["argparse", "asyncio", "collections", "csv", "dataclasses", "datetime", "decimal", "email",
                  "functools", "http.client", "inspect", "json", "logging", "os", "pathlib", "pickle", "re",
                  "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap",
                  "threading", "typing", "unittest", "urllib.request", "zipfile"]


def english_text(n_bytes: int) -> str:
    docs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in STDLIB_MODULES:
            module = importlib.import_module(name)
            objects = [module, *vars(module).values()]
            docs += [obj.__doc__ for obj in objects if isinstance(getattr(obj, "__doc__", None), str)]
    corpus = "\n\n".join(dict.fromkeys(docs))
    text = (corpus * (n_bytes // len(corpus.encode()) + 1))
    return text.encode()[:n_bytes].decode("utf-8", errors="ignore")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds of `repeats` calls, and the last result."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.0)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    text = english_text(int(args.mb * 1_000_000))
    raw = text.encode()
    print(f"# CPU: {cpu_name()} ({platform.python_implementation()} {platform.python_version()}), "
          f"llama-cpp-python {llama_cpp.__version__}, text {len(raw):,} bytes")
    # The machines here are shared, so CPU seconds (process_time) are the steadier measure; wall is shown too.
    print("| model | from_gguf(path) wall / CPU s | build from decoded metadata wall / CPU s "
          "| rocmforge tok/s (CPU; wall) | llama.cpp tok/s (CPU; wall) | ratio ours/llama.cpp (CPU) | ids identical |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        path = resolve(name)
        file_wall, file_cpu, _ = timed(lambda: Tokenizer.from_gguf(path), args.repeats)
        meta = GGUFFile(path).metadata
        meta = {key: meta[key] for key in meta.keys()}  # decode the arrays outside the timed build
        build_wall, build_cpu, tok = timed(lambda: Tokenizer(meta), args.repeats)
        ours_wall, ours_cpu, ours = timed(lambda: tok.encode(text, add_bos=False), args.repeats)
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        ref_wall, ref_cpu, ref = timed(lambda: llm.tokenize(raw, add_bos=False, special=True), args.repeats)
        print(f"| {name} | {file_wall:.3f} / {file_cpu:.3f} | {build_wall:.3f} / {build_cpu:.3f} "
              f"| {len(ours) / ours_cpu:,.0f}; {len(ours) / ours_wall:,.0f} "
              f"| {len(ref) / ref_cpu:,.0f}; {len(ref) / ref_wall:,.0f} | {ref_cpu / ours_cpu:.2f} "
              f"| {ours == ref} ({len(ours):,} tokens) |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
