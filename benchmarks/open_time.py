"""Open + config time of a GGUF: rocmforge's GGUFFile vs gguf's stock GGUFReader, in the same run.

    python benchmarks/open_time.py [MODEL ...]
"""
from __future__ import annotations

import platform
import statistics
import sys
import time

import gguf

from rocmforge.gguf_file import GGUFFile
from rocmforge.registry import resolve


def cpu_name() -> str:
    for line in open("/proc/cpuinfo", encoding="utf-8"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def best_of(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(names: list[str]) -> None:
    print(f"# open + config, median of 5, {cpu_name()}, {time.strftime('%Y-%m-%d')}")
    print("| model | gguf.GGUFReader s | rocmforge GGUFFile + config s | speed-up |")
    print("|---|---|---|---|")
    for name in names:
        path = resolve(name)
        stock = best_of(lambda: gguf.GGUFReader(path), repeat=3)
        ours = best_of(lambda: GGUFFile(path).config)
        print(f"| {name} | {stock:.3f} | {ours:.3f} | {stock / ours:.1f}x |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["smollm2-135m", "gemma3-270m"])
