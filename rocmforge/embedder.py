"""Text embedders for the context store: callables ``texts -> float32 [n, dim]`` with unit-length rows.

* ``MiniLMEmbedder``: all-MiniLM-L6-v2 (384 dims) run by rocmforge's BERT encoder, on the CPU or a GPU.
* ``HashedNgramEmbedder``: a lexical fallback. Each text becomes a bag of words and character
  3-grams, each hashed (crc32, stable across processes) into one of ``dim`` signed buckets, then
  L2-normalised. It finds texts that share words and spellings, not meaning; it needs no download.
* ``default_embedder()``: MiniLM when it can be fetched (or is cached), otherwise the fallback, with a
  logged warning saying so.

>>> from rocmforge.embedder import HashedNgramEmbedder
>>> embed = HashedNgramEmbedder()
>>> embed(["the cat sat", "a cat sat down"]).shape
(2, 384)
"""
from __future__ import annotations

import logging
import re
import zlib
from pathlib import Path

import numpy as np

from rocmforge import registry
from rocmforge.arch.bert import BertEncoder
from rocmforge.errors import FetchError, ModelFileError

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+")


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings. Texts are packed, in order, into batches of at most ``batch_tokens``
    tokens (a longer text alone; no padding); ``device`` is "cpu", "cuda", "hip" or "auto" (``$ROCMFORGE_DEVICE``).

    >>> embed = MiniLMEmbedder()            # doctest: +SKIP
    >>> embed(["hello world"]).shape        # doctest: +SKIP
    (1, 384)
    """

    name = "minilm-l6"

    def __init__(self, folder: str | Path | None = None, batch_tokens: int | None = None, max_tokens: int = 256,
                 device: str | None = "cpu"):
        folder = Path(folder) if folder is not None else registry.resolve("minilm-l6").parent
        self.encoder = BertEncoder.from_dir(folder, max_tokens=max_tokens, device=device)
        self.dim = self.encoder.dim
        # CPU: 2048 tokens keep each activation (the feed-forward's [n, 1536]: 12 MB) small enough that the C
        # library's allocator reuses its memory instead of mapping fresh pages for every one (4096 tokens: ~10%
        # slower, mostly page faults); a GPU wants tens of thousands per launch
        self.batch_tokens = batch_tokens or (65536 if self.encoder.on_gpu else 2048)
        self.max_tokens = self.encoder.max_tokens

    def __call__(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids, offsets = self.encoder.tokenize(texts)  # all at once: batches are then cut by true token counts
        first = 0
        while first < len(texts):
            last = first + 1
            while last < len(texts) and offsets[last + 1] - offsets[first] <= self.batch_tokens:
                last += 1
            out[first:last] = self.encoder.encode_tokens(ids[offsets[first]:offsets[last]],
                                                         offsets[first:last + 1] - offsets[first])
            first = last
        return out

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the word pieces of ``text`` (no truncation), so chunks fit the model window."""
        self.encoder.tokenizer.no_truncation()
        try:
            encoding = self.encoder.tokenizer.encode(text, add_special_tokens=False)
        finally:
            self.encoder.tokenizer.enable_truncation(self.max_tokens)
        return [span for span in encoding.offsets if span[1] > span[0]]


class HashedNgramEmbedder:
    """Lexical fallback: hashed words and character 3-grams in ``dim`` signed buckets, L2-normalised."""

    def __init__(self, dim: int = 384, ngram: int = 3):
        self.dim = dim
        self.ngram = ngram
        self.name = f"hashed-ngram-{dim}"

    def _features(self, text: str) -> list[str]:
        words = _WORD.findall(text.lower())
        grams = []
        for word in words:
            padded = f" {word} "
            grams.extend(padded[i:i + self.ngram] for i in range(max(1, len(padded) - self.ngram + 1)))
        return [f"w:{w}" for w in words] + [f"g:{g}" for g in grams]

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature in self._features(text):
                h = zlib.crc32(feature.encode())
                # One hash bit picks the sign so unrelated features cancel instead of piling up.
                out[row, h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


def default_embedder(progress: bool = False, device: str | None = "cpu") -> MiniLMEmbedder | HashedNgramEmbedder:
    """MiniLM (on ``device``) if it is cached or can be fetched; otherwise the hashed n-gram fallback (and a warning)."""
    try:
        if not registry.is_cached("minilm-l6"):
            registry.pull("minilm-l6", progress=progress)
        return MiniLMEmbedder(registry.model_dir("minilm-l6"), device=device)
    except (FetchError, ModelFileError) as exc:
        log.warning("all-MiniLM-L6-v2 is unavailable (%s); using the lexical hashed n-gram embedder, "
                    "which matches shared words, not meaning", exc)
        return HashedNgramEmbedder()
