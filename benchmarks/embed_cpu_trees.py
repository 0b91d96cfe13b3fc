"""MiniLM on the CPU: this tree against the whole tree of an earlier commit (ops, backend and encoder alike), in
alternating processes, so a busy machine slows both alike.

    python benchmarks/embed_cpu_trees.py [--peer-commit 3cc9e5d] [--passages 96] [--processes 3] [--rounds 3]

``embed_cpu.py`` swaps only ``arch/bert.py`` in; a change to the ops needs the earlier tree itself, which only a
process of its own can import. Each process embeds the same passages (the store's chunks of the pydoc set)
``--rounds`` times and reports its best wall time and CPU seconds; sides alternate ``--processes`` times. Set
``NUMBA_NUM_THREADS=1`` to compare work alone (CPU seconds with no thread waiting on another).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ONE_SIDE = """
import json, sys, time
from pathlib import Path
from context_store.chunk import chunk_text
from context_store.evaluate import RetrievalSet
from rocmforge.embedder import MiniLMEmbedder
n, rounds, sets = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
embed = MiniLMEmbedder()
texts = [c.text for p in RetrievalSet.load(sets / "pydoc").corpus.values()
         for c in chunk_text(p["text"], 200, 40, embed.token_spans)]
texts = texts[:: max(1, len(texts) // n)][:n]
embed(texts[:8])  # numba compiles (or loads its cache) outside the clock
best_wall = best_cpu = float("inf")
for _ in range(rounds):
    wall, cpu = time.perf_counter(), time.process_time()
    embed(texts)
    best_wall, best_cpu = min(best_wall, time.perf_counter() - wall), min(best_cpu, time.process_time() - cpu)
print(json.dumps({"wall": best_wall, "cpu": best_cpu}))
"""


def run_side(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    sets = ROOT / "tests" / "fixtures" / "retrieval"
    result = subprocess.run([sys.executable, "-c", ONE_SIDE, str(args.passages), str(args.rounds), str(sets)],
                            cwd=tree, env=env, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-commit", default="3cc9e5d")
    parser.add_argument("--passages", type=int, default=96)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    peer_tree = Path(tempfile.mkdtemp(prefix="embed_peer_"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.peer_commit], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(peer_tree)], input=archive.stdout, check=True)
    print(f"{args.passages} passages, NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', 'all cores')}; "
          f"load average before {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    best = {"peer": {"wall": float("inf"), "cpu": float("inf")}, "ours": {"wall": float("inf"), "cpu": float("inf")}}
    for i in range(args.processes):
        for side, tree in (("peer", peer_tree), ("ours", ROOT)):
            got = run_side(tree, args)
            print(f"process {i} {side}: {args.passages / got['wall']:.1f} passages/s, CPU {got['cpu']:.2f} s", flush=True)
            best[side] = {k: min(best[side][k], got[k]) for k in got}
    print(f"load average after {os.getloadavg()[0]:.1f}")
    print("| tree | passages/s (best) | CPU s per passage set (best) |\n|---|---|---|")
    for side, name in (("peer", f"{args.peer_commit} (peer)"), ("ours", "this tree (ours)")):
        print(f"| {name} | {args.passages / best[side]['wall']:.1f} | {best[side]['cpu']:.2f} |")
    print(f"ratio {best['peer']['wall'] / best['ours']['wall']:.2f}x (wall), "
          f"{best['peer']['cpu'] / best['ours']['cpu']:.2f}x (CPU)")


if __name__ == "__main__":
    main()
