"""Serving throughput: rocmforge's server (continuous batching) beside llama-cpp-python's own server, same model,
same run, same CPU. Each server runs alone (the other is stopped), with 1, 4 and 16 concurrent streaming clients.

    python benchmarks/serve.py [-m smollm2-135m] [--clients 1,4,16] [--requests 2] [--max-tokens 32]

On a GPU machine: ``rocmforge serve --device cuda`` beside llama.cpp's ``llama-server -np <clients>`` (all layers
on the GPU, flash attention on), prompts of exactly ``--prompt-tokens`` token ids:

    python benchmarks/serve.py -m MODEL --device cuda --llama-server build/bin/llama-server \
        --clients 64 --requests 1 --prompt-tokens 128 --max-tokens 256

Every request is a greedy streaming completion of a distinct prompt with the end-of-generation tokens banned
(``logit_bias``), so each produces exactly ``--max-tokens`` tokens on both servers. Reported per server and
concurrency: aggregate output tok/s (all tokens / wall time), p50/p99 time to first token, and the mean
per-stream decode rate (tokens after the first / time after the first). llama-cpp-python's server needs
``pip install 'llama-cpp-python[server]'``; it runs one request at a time, so the median decode rate of its
requests is its single-stream decode rate, the yardstick for rocmforge's aggregate at the highest concurrency.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import httpx

from rocmforge.gguf_file import GGUFFile
from rocmforge.registry import resolve
from rocmforge.tokenizer import Tokenizer

PROMPTS = [f"Write a short story about {topic}." for topic in (
    "a lighthouse keeper", "a lost robot", "the last bookshop", "a dragon who hates fire", "a river that flows uphill",
    "an old violin", "a city under the sea", "a clockmaker", "a winter garden", "a talking cat", "a desert train",
    "a forgotten moon base", "a bridge of glass", "a baker at midnight", "a paper airplane", "a mountain choir")]


@dataclass
class Result:
    ttft: float
    tokens: int
    decode_seconds: float  # from the first token to the last


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int, timeout: float = 600) -> subprocess.Popen:
    """Start a server process and wait (bounded) until /v1/models answers."""
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty server must never block on a full pipe
    # OPENBLAS_CORETYPE (set on some machines here for an older OpenBLAS) would force a slower kernel on
    # rocmforge's numpy: let OpenBLAS pick the CPU's own (SkylakeX on this AVX-512 EPYC). llama.cpp ignores it.
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{' '.join(command[:4])} exited: {log.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{command[0]} did not answer within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_request(url: str, prompt: str | list[int], max_tokens: int, logit_bias: dict[str, float]) -> Result:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "logit_bias": logit_bias}
    start_time, first, tokens, usage = time.perf_counter(), None, 0, None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if chunk["choices"] and chunk["choices"][0].get("text"):
                tokens += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    if usage:  # a chunk can carry more than one token (a UTF-8 character split across tokens)
        tokens = usage["completion_tokens"]
    first = first or end
    return Result(first - start_time, tokens, end - first)


def load_test(url: str, clients: int, requests: int, max_tokens: int, logit_bias: dict[str, float],
              prompts: list[str] | list[list[int]]) -> tuple[list[Result], float, list[str]]:
    """Every client sends ``requests`` streaming requests one after another -> (results, wall seconds, errors)."""
    results: list[Result] = []
    errors: list[str] = []
    lock, barrier = threading.Lock(), threading.Barrier(clients)

    def client(i: int) -> None:
        barrier.wait()
        for r in range(requests):
            try:
                result = one_request(url, prompts[(i * requests + r) % len(prompts)], max_tokens, logit_bias)
            except (httpx.HTTPError, ValueError, KeyError) as error:  # counted and reported, never hidden
                with lock:
                    errors.append(f"{type(error).__name__}: {error}")
                continue
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - began, errors


def token_prompts(tokenizer: Tokenizer, n_tokens: int, count: int) -> list[list[int]]:
    """``count`` distinct prompts of exactly ``n_tokens`` token ids (the stories' text, each started elsewhere)."""
    ids = tokenizer.encode(" ".join(PROMPTS * (n_tokens // 4 + 1)), add_bos=False)
    if len(ids) < n_tokens + count:
        raise ValueError(f"{len(ids)} prompt tokens are too few for {count} prompts of {n_tokens}")
    return [ids[i:i + n_tokens] for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def cpu_name() -> str:
    for line in open("/proc/cpuinfo", encoding="utf-8"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="smollm2-135m")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp threads")
    parser.add_argument("--rocmforge-threads", type=int, default=os.cpu_count() or 1,
                        help="rocmforge serve --threads: parallel forwards, one BLAS thread each")
    parser.add_argument("--rocmforge-blas-threads", type=int, default=1,
                        help="rocmforge serve --blas-threads: BLAS threads inside each forward")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--device", default="cpu", help="rocmforge serve --device; a GPU (cuda, hip) runs that "
                        "server alone beside --llama-server")
    parser.add_argument("--llama-server", help="path of llama.cpp's llama-server, run with -np <most clients>, "
                        "-ngl 99 and -fa on")
    parser.add_argument("--prompt-tokens", type=int, help="prompts of exactly this many token ids")
    args = parser.parse_args()
    concurrency = [int(c) for c in args.clients.split(",")]
    path = str(resolve(args.model))
    tokenizer = Tokenizer.from_gguf(GGUFFile(path))
    logit_bias = {str(t): -100.0 for t in tokenizer.eot_ids}
    prompts = (token_prompts(tokenizer, args.prompt_tokens, max(concurrency) * args.requests) if args.prompt_tokens
               else PROMPTS)
    python = sys.executable
    ours = [python, "-m", "rocmforge.cli.main", "serve", "-m", path, "--max-batch", str(max(concurrency)),
            "--n-ctx", str(args.n_ctx), "--no-embeddings"]
    if args.device not in ("cpu", "cpu-exact"):
        servers = {f"rocmforge --device {args.device}": [*ours, "--device", args.device]}
        args.skip_llama_cpp = True  # llama-cpp-python here is a CPU build: its peer is --llama-server
    else:
        ours += ["--threads", str(args.rocmforge_threads), "--blas-threads", str(args.rocmforge_blas_threads)]
        servers = {"rocmforge": ours, "rocmforge --no-batch-invariant": [*ours, "--no-batch-invariant"],
                   "rocmforge --device cpu-exact": [*ours, "--device", "cpu-exact"]}
    if args.llama_server:
        slots = max(concurrency)  # llama-server splits -c over its slots
        servers[f"llama-server -np {slots}"] = [args.llama_server, "-m", path, "-np", str(slots), "-c",
                                                str(args.n_ctx * slots), "-ngl", "99", "-fa", "on"]
    if not args.skip_llama_cpp:
        # interrupt_requests False: queue concurrent requests instead of cutting the running stream off
        servers["llama-cpp-python"] = [python, "-m", "llama_cpp.server", "--model", path, "--n_ctx", str(args.n_ctx),
                                       "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                                       "--interrupt_requests", "False", "--verbose", "False"]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {cpu_name()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start; {args.model}, {args.max_tokens} tokens per request, "
          f"{args.requests} requests per client, greedy; llama.cpp threads {args.threads}, rocmforge --threads "
          f"{args.rocmforge_threads} --blas-threads {args.rocmforge_blas_threads}; servers started without OPENBLAS_CORETYPE "
          f"(here: {os.environ.get('OPENBLAS_CORETYPE', 'unset')})")
    print("| server | clients | requests | errors | aggregate tok/s | TTFT p50 s | TTFT p99 s | per-stream decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    aggregate: dict[tuple[str, int], float] = {}
    single_stream: list[float] = []  # llama-cpp-python serves one request at a time: each is a single stream
    for name, command in servers.items():
        port = free_port()
        proc = start([*command, "--host", "127.0.0.1", "--port", str(port)], port)
        url = f"http://127.0.0.1:{port}"
        try:
            one_request(url, "Warm up.", 4, logit_bias)
            for clients in concurrency:
                results, wall, errors = load_test(url, clients, args.requests, args.max_tokens, logit_bias, prompts)
                for error in errors[:3]:
                    print(f"<!-- {name}, {clients} clients: {error} -->", flush=True)
                total = sum(r.tokens for r in results)
                ttfts = [r.ttft for r in results] or [float("nan")]
                rates = [(r.tokens - 1) / r.decode_seconds for r in results if r.decode_seconds > 0] or [float("nan")]
                if name == "llama-cpp-python":
                    single_stream += rates
                aggregate[(name, clients)] = total / wall
                print(f"| {name} | {clients} | {len(results)} | {len(errors)} | {total / wall:.1f} | "
                      f"{percentile(ttfts, 0.5):.2f} | {percentile(ttfts, 0.99):.2f} | {statistics.mean(rates):.1f} |",
                      flush=True)
        finally:
            stop(proc)
    most = max(concurrency)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    peer = next((name for name in servers if name.startswith("llama-server")), None)
    if peer is not None:
        for name in servers:
            if name != peer:
                ratio = aggregate[(name, most)] / aggregate[(peer, most)]
                print(f"{name} at {most} clients: {ratio:.2f}x {peer}'s aggregate tok/s (target 1.5x)")
    if single_stream:
        reference = statistics.median(single_stream)
        print(f"llama-cpp-python single-stream decode: median {reference:.1f} tok/s over {len(single_stream)} requests "
              f"(it serves one request at a time, so every request is a single stream)")
        for name in servers:
            if name != "llama-cpp-python":
                ours = aggregate[(name, most)]
                print(f"{name} at {most} clients: {ours:.1f} tok/s = {ours / reference:.2f}x that rate (target 3x)")


if __name__ == "__main__":
    main()
