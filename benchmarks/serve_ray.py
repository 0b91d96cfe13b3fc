"""Ray Serve's overhead: ``rocmforge serve --replicas 1`` (one engine behind Ray Serve's proxy and the router)
beside plain ``rocmforge serve``, same model, same options, same machine.

    python -m benchmarks.serve_ray [-m smollm2-135m] [--clients 16] [--rounds 3] [--max-tokens 32]

Both servers stay up for the whole run and take turns (round 1 plain, round 1 Ray, round 2 plain, ...), so load
from anything else on the machine hits both alike. Each round: ``--clients`` concurrent streaming clients, each
sending ``--requests`` greedy completions of distinct prompts with the end tokens banned (every request makes
exactly ``--max-tokens`` tokens; ``benchmarks/serve.py``'s load generator). Reported: aggregate output tok/s per
round, and the median over rounds of each Ray round's rate over the plain round just before it (Ray / plain; the
issue's bar is >= 0.9): on a machine shared with other work the load drifts between rounds, and a ratio of
neighbours follows it where a ratio of medians taken over different rounds would not.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from benchmarks.serve import PROMPTS, cpu_name, free_port, load_test, one_request, start, stop
from rocmforge.gguf_file import GGUFFile
from rocmforge.registry import resolve
from rocmforge.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="requests per client per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--n-ctx", type=int, default=512)
    args = parser.parse_args()
    path = str(resolve(args.model))
    logit_bias = {str(t): -100.0 for t in Tokenizer.from_gguf(GGUFFile(path)).eot_ids}
    plain = [sys.executable, "-m", "rocmforge.cli.main", "serve", "-m", path, "--max-batch", str(args.clients),
             "--n-ctx", str(args.n_ctx), "--no-embeddings", "--threads", str(os.cpu_count() or 1)]
    servers = {"rocmforge serve": plain, "rocmforge serve --replicas 1 (Ray Serve)": [*plain, "--replicas", "1"]}
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {cpu_name()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start; {args.model}, {args.clients} clients x {args.requests} requests x "
          f"{args.max_tokens} tokens per round, greedy; {args.rounds} alternating rounds")
    running, urls = {}, {}
    try:
        for name, command in servers.items():
            port = free_port()
            running[name] = start([*command, "--host", "127.0.0.1", "--port", str(port)], port)
            urls[name] = f"http://127.0.0.1:{port}"
            one_request(urls[name], "Warm up.", 4, logit_bias)
        print("| round | server | aggregate tok/s |")
        print("|---|---|---|")
        rates: dict[str, list[float]] = {name: [] for name in servers}
        for round_ in range(1, args.rounds + 1):
            for name in servers:
                results, wall, errors = load_test(urls[name], args.clients, args.requests, args.max_tokens,
                                                  logit_bias, PROMPTS)
                if errors:
                    raise RuntimeError(f"{name}: {len(errors)} failed requests, first: {errors[0]}")
                rates[name].append(sum(r.tokens for r in results) / wall)
                print(f"| {round_} | {name} | {rates[name][-1]:.1f} |", flush=True)
    finally:
        for proc in running.values():
            stop(proc)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    plain_rates, ray_rates = rates.values()
    ratio = statistics.median(r / p for r, p in zip(ray_rates, plain_rates))
    print("\nmedian aggregate tok/s: " + ", ".join(f"{n} {m:.1f}" for n, m in medians.items()))
    print(f"Ray Serve / plain, median of the rounds' ratios: {ratio:.2f}x (bar: >= 0.90x); "
          f"{time.strftime('%H:%M', time.gmtime())} UTC, load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
