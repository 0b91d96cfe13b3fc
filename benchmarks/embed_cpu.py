"""MiniLM passages/s on this CPU: rocmforge's encoder against an earlier version of it, side by side.

    python benchmarks/embed_cpu.py [--peer-commit 43a61f9] [--passages 192] [--rounds 3]

The passages are the store's own chunks (200 word pieces, 40 shared) of the pydoc retrieval set, the same texts
for both; each round times the peer and ours one after the other, so a busy machine slows both alike. The peer is
``rocmforge/arch/bert.py`` as it was at ``--peer-commit``, loaded from git, on today's ops: 43a61f9's padded numpy
batches of 32, or a packed encoder's forward in the embedder's batches. Prints the load average before and after
(the machine is shared) and the ratio per round.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from context_store.chunk import chunk_text  # noqa: E402
from context_store.evaluate import RetrievalSet  # noqa: E402
from rocmforge import registry  # noqa: E402
from rocmforge.embedder import MiniLMEmbedder  # noqa: E402


def peer_encoder(commit: str, folder: Path):
    """The BertEncoder class of ``rocmforge/arch/bert.py`` at ``commit``, loaded as a module of its own."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:rocmforge/arch/bert.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "bert_peer.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("bert_peer", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bert_peer"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.BertEncoder.from_dir(folder)


def passages(embed: MiniLMEmbedder, n: int) -> list[str]:
    data = RetrievalSet.load(ROOT / "tests" / "fixtures" / "retrieval" / "pydoc")
    texts = []
    for p in data.corpus.values():
        texts += [c.text for c in chunk_text(p["text"], 200, 40, embed.token_spans)]
    return texts[:: max(1, len(texts) // n)][:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-commit", default="43a61f9")
    parser.add_argument("--passages", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = registry.resolve("minilm-l6").parent
    ours = MiniLMEmbedder(folder)
    peer = peer_encoder(args.peer_commit, folder)
    texts = passages(ours, args.passages)
    tokens = sum(len(e.ids) for e in ours.encoder.tokenizer.encode_batch(texts))

    def peer_embed(batch: list[str]) -> np.ndarray:
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        out = np.zeros((len(batch), 384), np.float32)
        for s in range(0, len(order), 32):
            idx = order[s:s + 32]
            out[idx] = peer.encode([batch[i] for i in idx])
        return out

    if hasattr(peer, "encode_tokens"):  # a packed encoder (a0a95fe on): the embedder's own batches, as ours
        peer_embed = MiniLMEmbedder(folder)
        peer_embed.encoder = peer

    ours(texts[:8]), peer_embed(texts[:8])  # numba compiles (or loads its cache) outside the clock
    print(f"{len(texts)} passages, {tokens / len(texts):.0f} tokens each on average; load average before "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows = []
    for r in range(args.rounds):
        timed = []
        for embed in (peer_embed, ours):
            wall, cpu = time.perf_counter(), time.process_time()
            vectors = embed(texts)
            timed += [time.perf_counter() - wall, time.process_time() - cpu, vectors]
        t_peer, c_peer, theirs, t_ours, c_ours, mine = timed
        rows.append((t_peer, t_ours, c_peer, c_ours))
        print(f"round {r}: peer {len(texts) / t_peer:.1f}/s, ours {len(texts) / t_ours:.1f}/s, "
              f"ratio {t_peer / t_ours:.2f}x; CPU s peer {c_peer:.2f}, ours {c_ours:.2f}; "
              f"max |diff| {np.abs(mine - theirs).max():.1e}", flush=True)
    t_peer, t_ours, c_peer, c_ours = (min(c) for c in zip(*rows))
    print(f"load average after {os.getloadavg()[0]:.1f}")
    print(f"| encoder | passages/s (best round) | tokens/s | CPU s (best round) |\n|---|---|---|---|")
    print(f"| {args.peer_commit} (peer) | {len(texts) / t_peer:.1f} | {tokens / t_peer:,.0f} | {c_peer:.2f} |")
    print(f"| this tree (ours) | {len(texts) / t_ours:.1f} | {tokens / t_ours:,.0f} | {c_ours:.2f} |")
    print(f"ratio {t_peer / t_ours:.2f}x (wall), {c_peer / c_ours:.2f}x (CPU time: on a busy machine the steadier "
          f"measure of work; run with NUMBA_NUM_THREADS=1 to count no thread waiting)")

if __name__ == "__main__":
    main()
