"""BERT encoder in numpy, for sentence embedders such as all-MiniLM-L6-v2.

Reads like Devlin et al. (2019), post-norm Transformer encoder:

    h = LayerNorm(word_emb[ids] + pos_emb[positions] + type_emb[0])
    for each layer:
        h = LayerNorm(h + Attention(h) W_o)           # multi-head self-attention, padding masked
        h = LayerNorm(h + GELU(h W_in) W_out)         # feed-forward
    sentence = normalize(mean of h over real tokens)  # sentence-transformers pooling for MiniLM

Weights come straight from the HF ``model.safetensors`` (``safetensors.numpy``), text goes through
the model's own ``tokenizer.json`` (``tokenizers``), truncated at 256 tokens like sentence-transformers.

>>> from rocmforge.arch.bert import BertEncoder
>>> enc = BertEncoder.from_dir("~/.cache/rocmforge/models/minilm-l6")  # doctest: +SKIP
>>> enc.encode(["hello world"]).shape  # doctest: +SKIP
(1, 384)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from rocmforge.errors import ModelFileError
from rocmforge.ops.softmax import softmax


@dataclass(frozen=True)
class BertConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    max_positions: int

    @classmethod
    def from_json(cls, path: Path) -> "BertConfig":
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ModelFileError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (only exact gelu)")
        return cls(raw["hidden_size"], raw["num_hidden_layers"], raw["num_attention_heads"],
                   raw["intermediate_size"], raw["layer_norm_eps"], raw["max_position_embeddings"])


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7): numpy has no erf and float32 needs no better."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU that BERT uses, not the tanh approximation."""
    return 0.5 * x * (1.0 + erf(x * np.float32(1.0 / np.sqrt(2.0))))


class BertEncoder:
    """A BERT encoder with mean pooling and L2 normalisation (sentence-transformers style)."""

    def __init__(self, weights: dict[str, np.ndarray], config: BertConfig, tokenizer: Tokenizer,
                 max_tokens: int = 256):
        self.w = {k: v.astype(np.float32) for k, v in weights.items() if v.dtype.kind == "f"}
        self.config = config
        self.tokenizer = tokenizer
        self.max_tokens = min(max_tokens, config.max_positions)
        self.tokenizer.enable_truncation(self.max_tokens)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch
        self.dim = config.hidden_size

    @classmethod
    def from_dir(cls, folder: str | Path, max_tokens: int = 256) -> "BertEncoder":
        """Load ``model.safetensors``, ``config.json`` and ``tokenizer.json`` from one folder."""
        folder = Path(folder).expanduser()
        files = {name: folder / name for name in ("model.safetensors", "config.json", "tokenizer.json")}
        missing = [name for name, p in files.items() if not p.is_file()]
        if missing:
            raise ModelFileError(f"{folder}: missing {', '.join(missing)}")
        weights = load_file(str(files["model.safetensors"]))
        return cls(weights, BertConfig.from_json(files["config.json"]),
                   Tokenizer.from_file(str(files["tokenizer.json"])), max_tokens)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (token ids [n, t], attention mask [n, t]), padded to the longest text."""
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        return ids, mask

    def hidden_states(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Token ids [n, t] -> last hidden states [n, t, hidden]."""
        w, cfg = self.w, self.config
        n, t = ids.shape
        h = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:t]
             + w["embeddings.token_type_embeddings.weight"][0])
        h = layer_norm(h, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], cfg.layer_norm_eps)
        # Padding keys get -inf-like scores so real tokens never attend to them.
        key_bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
        for i in range(cfg.num_layers):
            h = self._layer(h, key_bias, f"encoder.layer.{i}.")
        return h

    def _layer(self, h: np.ndarray, key_bias: np.ndarray, p: str) -> np.ndarray:
        w, cfg = self.w, self.config
        n, t, d = h.shape
        heads, head_dim = cfg.num_heads, d // cfg.num_heads

        def linear(x: np.ndarray, name: str) -> np.ndarray:
            # One 2-D GEMM over all tokens: numpy's stacked 3-D matmul is several times slower here.
            weight = w[p + name + ".weight"]
            y = x.reshape(-1, x.shape[-1]) @ weight.T + w[p + name + ".bias"]
            return y.reshape(*x.shape[:-1], weight.shape[0])

        def split_heads(x: np.ndarray) -> np.ndarray:
            # Contiguous copies: batched matmul on the strided view is ~20x slower.
            return np.ascontiguousarray(x.reshape(n, t, heads, head_dim).transpose(0, 2, 1, 3))

        q = split_heads(linear(h, "attention.self.query"))
        k = split_heads(linear(h, "attention.self.key"))
        v = split_heads(linear(h, "attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) * np.float32(1.0 / np.sqrt(head_dim)) + key_bias
        context = (softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(n, t, d)
        h = layer_norm(h + linear(context, "attention.output.dense"),
                       w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"],
                       cfg.layer_norm_eps)
        ffn = linear(gelu(linear(h, "intermediate.dense")), "output.dense")
        return layer_norm(h + ffn, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"],
                          cfg.layer_norm_eps)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Texts -> unit-length sentence vectors [n, hidden] (float32): mean over real tokens, then L2."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids, mask = self.tokenize(texts)
        h = self.hidden_states(ids, mask)
        summed = (h * mask[:, :, None]).sum(1)
        mean = summed / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        norm = np.linalg.norm(mean, axis=1, keepdims=True)
        return (mean / np.maximum(norm, 1e-12)).astype(np.float32)
