"""Many sequences at once on the GPU, in llama-batched-bench's table shape, and side by side with llama.cpp.

    python benchmarks/gpu_batched.py run MODEL.gguf [--batches 1,8,32,64] [--n-prompt 128] [--n-gen 128] [--json out.json]
    python benchmarks/gpu_batched.py compare ours.json [...] --batched llama_batched.log [...] --bench llama_bench.log [...]

``run``: B sequences with random 128-token prompts go through ``rocmforge.engine.step_all``: one tick prefills
every prompt (one eager batched forward) and samples the first tokens on the host; each of the next 128 ticks is one
replayed decode graph of B rows with greedy sampling on the device (``GpuBackend.graph_step_batch``). Like
llama-batched-bench, end-of-generation tokens do not stop a sequence. Each B runs once untimed first (kernel
compilation, graph capture). T_PP is the first tick, T_TG the 128 decode ticks, host wall clock around work that
ends with token ids on the host. It then reports the GPU memory in use at each B and whether a KV cache for
64 sequences x 4,096 tokens passes the pre-load memory check (``backend_for_model``).

``compare``: our JSON files next to llama-batched-bench's and llama-bench's output for the same models: S_TG (decode
tokens per second over the whole batch) and the ratio, per model and B; llama-bench's tg128 next to our B=1.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rocmforge.backends.gpu_records import memory_needed  # noqa: E402
from rocmforge.backends.select import backend_for_model  # noqa: E402
from rocmforge.engine import step_all  # noqa: E402
from rocmforge.errors import DeviceError  # noqa: E402
from rocmforge.gguf_file import GGUFFile  # noqa: E402
from rocmforge.model import Model  # noqa: E402

HEADER = ("|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |\n"
          "|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|")


def one_run(model: Model, n_seqs: int, n_prompt: int, n_gen: int, rng: np.random.Generator) -> dict:
    vocab = model.cfg.vocab_size
    gens = [model.start(list(rng.integers(0, vocab, n_prompt)), max_new_tokens=n_gen + 1, temperature=0)
            for _ in range(n_seqs)]
    start = time.perf_counter()
    step_all(gens)  # the prompts, and the first token of each
    t_pp = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n_gen):
        step_all(gens)
    t_tg = time.perf_counter() - start
    assert all(g.n_generated == n_gen + 1 for g in gens)
    free, total = model.ops.rt.mem_info()
    for g in gens:
        g.close()
    pp, tg = n_seqs * n_prompt, n_seqs * n_gen
    return {"PP": n_prompt, "TG": n_gen, "B": n_seqs, "N_KV": n_seqs * (n_prompt + n_gen), "T_PP": t_pp,
            "S_PP": pp / t_pp, "T_TG": t_tg, "S_TG": tg / t_tg, "T": t_pp + t_tg, "S": (pp + tg) / (t_pp + t_tg),
            "gpu_mib_used": (total - free) / 2**20}


def row(r: dict) -> str:
    return (f"| {r['PP']:5d} | {r['TG']:6d} | {r['B']:4d} | {r['N_KV']:6d} | {r['T_PP']:8.3f} | {r['S_PP']:8.2f} | "
            f"{r['T_TG']:8.3f} | {r['S_TG']:8.2f} | {r['T']:8.3f} | {r['S']:8.2f} |")


def kv_check(path: Path, n_seqs: int = 64, n_ctx: int = 4096) -> dict:
    """Does a KV cache of ``n_seqs`` x ``n_ctx`` positions pass the check ``load`` makes before allocating?"""
    gguf = GGUFFile(path)
    weights, kv = memory_needed(gguf, n_seqs * n_ctx)
    try:
        ops = backend_for_model("cuda", gguf, n_seqs * n_ctx)
        free, total = ops.rt.mem_info()
        return {"passes": True, "weights_mib": weights / 2**20, "kv_mib": kv / 2**20, "free_after_mib": free / 2**20}
    except DeviceError as exc:
        return {"passes": False, "weights_mib": weights / 2**20, "kv_mib": kv / 2**20, "error": str(exc)}


def run(args: argparse.Namespace) -> None:
    batches = [int(b) for b in args.batches.split(",")]
    model = Model(args.model, device=args.device, n_ctx=args.n_prompt + args.n_gen + 16, n_parallel=max(batches))
    model.tokenizer.eot_ids = frozenset()  # as llama-batched-bench: every sequence decodes all its tokens
    rng = np.random.default_rng(0)
    print(f"{Path(args.model).name} on {model.ops.rt.device_name}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(HEADER)
    results = []
    for b in batches:
        one_run(model, b, args.n_prompt, 4, rng)  # compiles, captures this bucket's graph
        results.append(one_run(model, b, args.n_prompt, args.n_gen, rng))
        print(row(results[-1]) + f"  GPU memory in use: {results[-1]['gpu_mib_used']:,.0f} MiB", flush=True)
    check = kv_check(Path(args.model))
    print(f"KV for 64 x 4,096 tokens: {'passes' if check['passes'] else 'FAILS'} the pre-load check "
          f"(weights {check['weights_mib']:,.0f} MiB + KV {check['kv_mib']:,.0f} MiB)")
    if args.json:
        args.json.write_text(json.dumps({"model": Path(args.model).name, "device": model.ops.rt.device_name,
                                         "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "rows": results,
                                         "kv_64x4096": check}, indent=1))


def parse_batched(text: str) -> dict[int, float]:
    """B -> S_TG from llama-batched-bench's markdown table."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[2].isdigit():
            out[int(cells[2])] = float(cells[7])
    return out


def parse_bench(text: str) -> float | None:
    """tg128 tok/s from llama-bench's markdown table."""
    for line in text.splitlines():
        if "tg128" in line:
            match = re.search(r"([\d.]+) ± [\d.]+\s*\|?\s*$", line.strip())
            if match:
                return float(match.group(1))
    return None


def compare(args: argparse.Namespace) -> None:
    print("| model | B | llama-batched-bench S_TG t/s | rocmforge S_TG t/s | ratio |")
    print("|---|---|---|---|---|")
    for ours_path, batched_path, bench_path in zip(args.ours, args.batched, args.bench):
        ours = json.loads(Path(ours_path).read_text())
        peer = parse_batched(Path(batched_path).read_text()) if Path(batched_path).exists() else {}
        tg = parse_bench(Path(bench_path).read_text()) if Path(bench_path).exists() else None
        for r in ours["rows"]:
            p, s_tg = peer.get(r["B"]), r["S_TG"]
            ratio = f"{s_tg / p:.2f}x" if p else "n/a"
            print(f"| {ours['model']} | {r['B']} | {p if p else 'n/a'} | {s_tg:,.0f} | {ratio} |")
            if r["B"] == 1 and tg:
                print(f"| {ours['model']} | 1 (llama-bench tg128) | {tg:,.1f} | {r['S_TG']:,.0f} | {r['S_TG'] / tg:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("model")
    r.add_argument("--device", default="cuda")
    r.add_argument("--batches", default="1,8,32,64")
    r.add_argument("--n-prompt", type=int, default=128)
    r.add_argument("--n-gen", type=int, default=128)
    r.add_argument("--json", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("ours", nargs="+")
    c.add_argument("--batched", nargs="+", required=True)
    c.add_argument("--bench", nargs="+", required=True)
    args = parser.parse_args()
    run(args) if args.command == "run" else compare(args)


if __name__ == "__main__":
    main()
