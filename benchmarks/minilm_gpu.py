"""MiniLM on a GPU: rocmforge's BERT forward against PyTorch/transformers on the same card and weights.

    python3 benchmarks/minilm_gpu.py MODEL_DIR --texts TEXTS.json [--reference OUT.npy] [--corpus N --corpus-out DIR]

* check: our encoder (``device="cuda"``) against transformers' ``BertModel`` with sentence-transformers pooling on
  256 of the texts (max |difference|, lowest cosine);
* speed: passages/s of each on every text, batches sorted by length (ours packed, transformers padded), after a
  warm-up, ``torch.cuda.synchronize`` before each clock read; ours end to end (tokenize, upload, forward, pool)
  and forward only (pre-tokenized);
* ``--reference``: transformers' vectors of every text (what the retrieval tuning searched with);
* ``--corpus N``: N passages of real text (docstrings of the Python files on the machine, ~60 words each),
  embedded by transformers, written as int8 rows with a float32 scale each (files of at most 16 MiB) for the
  HNSW recall benchmark (``benchmarks/context_store.py``).

The machine that runs this needs torch and transformers (the lent GPU machines have them; rocmforge does not).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import BertModel, BertTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rocmforge.embedder import MiniLMEmbedder  # noqa: E402


def torch_embed(model: BertModel, tokenizer: BertTokenizerFast, texts: list[str], batch: int = 256) -> np.ndarray:
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with torch.no_grad():
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=256,
                            return_tensors="pt").to("cuda")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()
    return out


def timed(run, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def corpus_texts(n: int, words: int = 60) -> list[str]:
    """n distinct passages of ~``words`` words from the docstrings of the Python files on this machine."""
    roots = sorted({Path(p) for p in sys.path if p and Path(p).is_dir()})
    docstring = re.compile(r'"""(.{80,}?)"""', re.S)
    seen: dict[str, None] = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            try:
                source = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for match in docstring.finditer(source):
                tokens = match.group(1).split()
                for i in range(0, len(tokens) - 15, words):
                    seen.setdefault(" ".join(tokens[i:i + words]), None)
                    if len(seen) >= n:
                        return list(seen)
    return list(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--texts", required=True, help="JSON list of passages to time on (and embed)")
    parser.add_argument("--reference", help="write transformers' vectors of --texts here (.npy)")
    parser.add_argument("--corpus", type=int, default=0)
    parser.add_argument("--corpus-out", default=".")
    args = parser.parse_args()
    texts = json.loads(Path(args.texts).read_text())
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, {len(texts)} texts", flush=True)

    ours = MiniLMEmbedder(args.model_dir, device="cuda")
    tokenizer = BertTokenizerFast(tokenizer_file=str(Path(args.model_dir) / "tokenizer.json"))
    model = BertModel.from_pretrained(args.model_dir).float().cuda().eval()  # the file holds float16

    sample = texts[:: max(1, len(texts) // 256)][:256]
    mine, theirs = ours(sample), torch_embed(model, tokenizer, sample)
    cos = np.sum(mine.astype(np.float64) * theirs, axis=1)
    print(f"check: {len(sample)} texts, max |ours - transformers| {np.abs(mine - theirs).max():.2e}, "
          f"min cosine {cos.min():.7f}", flush=True)

    ours(texts[:512]), torch_embed(model, tokenizer, texts[:512])  # warm-up: kernels compiled, pools filled
    n_tokens = sum(len(e.ids) for e in ours.encoder.tokenizer.encode_batch(texts))
    ours_s = timed(lambda: ours(texts))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [ours.encoder.tokenize([texts[i] for i in order[s:s + 512]]) for s in range(0, len(order), 512)]
    forward_s = timed(lambda: [ours.encoder.hidden_states(ids, offsets) for ids, offsets in batches])
    torch_s = timed(lambda: torch_embed(model, tokenizer, texts))
    print(f"speed on {len(texts)} passages ({n_tokens / len(texts):.0f} tokens each on average):")
    print(f"| encoder | passages/s | tokens/s | vs transformers |\n|---|---|---|---|")
    for name, secs in (("rocmforge end to end", ours_s), ("rocmforge forward only", forward_s),
                       ("transformers fp32 (peer)", torch_s)):
        print(f"| {name} | {len(texts) / secs:,.0f} | {n_tokens / secs:,.0f} | {torch_s / secs:.2f}x |", flush=True)

    if args.reference:
        np.save(args.reference, torch_embed(model, tokenizer, texts))
    if args.corpus:
        passages = corpus_texts(args.corpus)
        start = time.perf_counter()
        vectors = torch_embed(model, tokenizer, passages)
        print(f"corpus: {len(passages)} passages embedded in {time.perf_counter() - start:.1f} s", flush=True)
        scale = np.abs(vectors).max(1, keepdims=True) / 127.0
        quantized = np.round(vectors / scale).astype(np.int8)
        out = Path(args.corpus_out)
        np.save(out / "corpus_scale.npy", scale.astype(np.float32))
        for part, rows in enumerate(np.array_split(quantized, -(-quantized.nbytes // (15 << 20)))):
            np.save(out / f"corpus_int8_{part}.npy", rows)


if __name__ == "__main__":
    main()
