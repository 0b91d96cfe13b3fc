"""Stress the CPU encoder ops for wrong results under concurrency (not a speed benchmark, not a test).

    python benchmarks/stress_cpu_encoder.py [--seconds 60] [--threads 3] [--what ops,embed] [--hold-threadpoolctl]

``ops``: ``linear`` and ``encoder_attention`` on random shapes, from ``--threads`` Python threads at once, each
result checked against numpy in float64 (the op's float32 error is ~1e-6 relative; a wrong block is off by O(1)).
``embed``: MiniLM on the same texts from several threads at once and one by one, against a single-threaded batched
run. ``--hold-threadpoolctl``: meanwhile another thread holds a ``threadpool_limits(2)`` (threadpoolctl then
ignores every other thread's limits, as when a test's server thread set one first). Prints every mismatch and a
count per check; exit status 1 if any.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rocmforge.ops.encoder_attention import encoder_attention  # noqa: E402
from rocmforge.ops.linear import linear  # noqa: E402

SHAPES = [(384, 384), (384, 1536), (1536, 384)]  # (in, out) of MiniLM's projections


def _attention_reference(q, k, v, offsets, heads, scale):
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    out = np.zeros_like(q)
    d = q.shape[1] // heads
    for s in range(len(offsets) - 1):
        a, b = offsets[s], offsets[s + 1]
        for h in range(heads):
            c = slice(h * d, h * d + d)
            scores = q[a:b, c] @ k[a:b, c].T * scale
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            out[a:b, c] = (p / p.sum(axis=1, keepdims=True)) @ v[a:b, c]
    return out


def check_ops(rng: np.random.Generator, failures: list[str]) -> int:
    """One random linear (with or without GELU) and one random attention, checked; returns calls made."""
    n = int(rng.choice([1, 7, 64, 255, 256, 300, 700]))
    k_in, m_out = SHAPES[rng.integers(len(SHAPES))]
    x = rng.standard_normal((n, k_in), dtype=np.float32)
    w = (rng.standard_normal((m_out, k_in), dtype=np.float32) / np.sqrt(k_in)).astype(np.float32)
    b = rng.standard_normal(m_out, dtype=np.float32)
    got = linear(x, w, b)
    want = x.astype(np.float64) @ w.T.astype(np.float64) + b
    err = float(np.max(np.abs(got - want)))
    if err > 1e-3:
        failures.append(f"linear n={n} {k_in}->{m_out}: max error {err:.3g}")
    lengths = rng.integers(1, 257, size=int(rng.integers(1, 9)))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    q, kk, v = (rng.standard_normal((int(offsets[-1]), 384), dtype=np.float32) for _ in range(3))
    got = encoder_attention(q, kk, v, offsets, 12, 0.125)
    err = float(np.max(np.abs(got - _attention_reference(q, kk, v, offsets, 12, 0.125))))
    if err > 1e-4:
        failures.append(f"attention lengths={lengths.tolist()}: max error {err:.3g}")
    return 2


def run_threads(target, n_threads: int, seconds: float) -> tuple[int, list[str]]:
    failures: list[str] = []
    calls = [0] * n_threads
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        while time.monotonic() < stop:
            calls[i] += target(i, failures)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(calls), failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--threads", type=int, default=3)
    parser.add_argument("--what", default="ops,embed")
    parser.add_argument("--hold-threadpoolctl", action="store_true")
    args = parser.parse_args()
    if args.hold_threadpoolctl:
        from threadpoolctl import threadpool_limits
        holding = threading.Event()

        def hold() -> None:
            with threadpool_limits(2, user_api="blas"):
                holding.set()
                threading.Event().wait()

        threading.Thread(target=hold, daemon=True).start()
        holding.wait()
    bad = 0
    if "ops" in args.what:
        rngs = [np.random.default_rng(i) for i in range(args.threads)]
        for n_threads in (1, args.threads):
            calls, failures = run_threads(lambda i, f: check_ops(rngs[i], f), n_threads, args.seconds / 2)
            print(f"ops from {n_threads} thread(s): {calls} calls, {len(failures)} wrong")
            for line in failures[:20]:
                print("  ", line)
            bad += len(failures)
    if "embed" in args.what:
        from rocmforge.embedder import MiniLMEmbedder
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import json
        fixtures = json.loads((Path(__file__).resolve().parents[1] / "tests" / "fixtures" /
                               "minilm_embeddings.json").read_text())
        texts = [item["text"] for item in fixtures["items"]]
        embed = MiniLMEmbedder(batch_tokens=64)
        want = embed(texts)

        def check_embed(i: int, failures: list[str]) -> int:
            order = np.random.default_rng().permutation(len(texts))
            got = embed([texts[j] for j in order]) if i % 2 else np.concatenate([embed([texts[j]]) for j in order])
            err = float(np.max(np.abs(got - want[order])))
            if err > 2e-6:
                failures.append(f"embed thread {i} ({'batched' if i % 2 else 'one by one'}): max error {err:.3g}")
            return 1

        calls, failures = run_threads(check_embed, args.threads, args.seconds)
        print(f"MiniLM from {args.threads} threads: {calls} calls, {len(failures)} wrong")
        for line in failures[:20]:
            print("  ", line)
        bad += len(failures)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
