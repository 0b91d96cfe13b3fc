"""BERT encoder on any rocmforge backend (numpy/numba on the CPU, the kernels on a GPU), for sentence embedders
such as all-MiniLM-L6-v2.

Reads like Devlin et al. (2019), post-norm Transformer encoder:

    h = LayerNorm(word_emb[ids] + pos_emb[positions] + type_emb[0])
    for each layer:
        h = LayerNorm(h + Attention(h) W_o)           # multi-head self-attention within each text
        h = LayerNorm(h + GELU(h W_in) W_out)         # feed-forward
    sentence = normalize(mean of h over the text's tokens)  # sentence-transformers pooling for MiniLM

Texts are packed, not padded: a batch is one ``[n_tokens, hidden]`` matrix with every text's tokens one after
another (``offsets`` says where each starts), so the matrix products do no work on padding and attention
(``Backend.encoder_attention``) stays within each text. Weights come straight from the HF ``model.safetensors``,
text goes through the model's own ``tokenizer.json``, truncated at 256 tokens like sentence-transformers (the
file itself says 128).

>>> from rocmforge.arch.bert import BertEncoder
>>> enc = BertEncoder.from_dir("~/.cache/rocmforge/models/minilm-l6")  # doctest: +SKIP
>>> enc.encode(["hello world"]).shape  # doctest: +SKIP
(1, 384)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from rocmforge.errors import ModelFileError
from rocmforge.gguf_file import TensorRef

# A GPU batch's token count is rounded up to this, so the device memory pool sees few distinct sizes.
GPU_TOKEN_STEP = 512
QKV = ("query", "key", "value")


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


def _backend(device: str | None) -> Any:
    """The backend for ``device``; on the CPU without llama.cpp's activation rounding (BERT's weights are float32)."""
    from rocmforge.backends.select import choose_device, select_backend
    from rocmforge.backends.cpu import CpuBackend

    name, _ = choose_device(device)
    return CpuBackend(round_activations=False) if name in ("cpu", "cpu-exact") else select_backend(name)


class BertEncoder:
    """A BERT encoder with mean pooling and L2 normalisation (sentence-transformers style) on ``device``."""

    def __init__(self, weights: dict[str, np.ndarray], config: BertConfig, tokenizer: Tokenizer,
                 max_tokens: int = 256, device: str | None = "cpu"):
        w = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items() if v.dtype.kind == "f"}
        w = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in w.items()}
        self.config = config
        self.tokenizer = tokenizer
        self.max_tokens = min(max_tokens, config.max_positions)
        self.tokenizer.enable_truncation(self.max_tokens)
        self.tokenizer.no_padding()  # packed batches: no padding tokens at all
        self.dim = config.hidden_size
        self.ops = _backend(device)
        self.on_gpu = self.ops.name != "cpu"
        # the embedding tables stay on the host: a batch's lookups are summed there and uploaded once
        self.word, self.position = w["embeddings.word_embeddings.weight"], w["embeddings.position_embeddings.weight"]
        self.token_type = w["embeddings.token_type_embeddings.weight"][0]
        if not self.on_gpu:  # one q|k|v product per layer (the CPU attention reads its column blocks in place)
            for i in range(config.num_layers):
                p = f"encoder.layer.{i}.attention.self."
                for kind in ("weight", "bias"):
                    w[p + "qkv." + kind] = np.concatenate([w.pop(p + f"{name}.{kind}") for name in QKV])
        self.w = {name: self._load(name, value) for name, value in w.items() if not name.startswith("embeddings.")
                  or "LayerNorm" in name}

    def _load(self, name: str, value: np.ndarray) -> Any:
        tensor = TensorRef(name, GGMLQuantizationType.F32, value.shape, value, value.nbytes)
        return self.ops.load_weight(tensor) if value.ndim == 2 else self.ops.load_vector(tensor)

    @classmethod
    def from_dir(cls, folder: str | Path, max_tokens: int = 256, device: str | None = "cpu") -> "BertEncoder":
        """Load ``model.safetensors``, ``config.json`` and ``tokenizer.json`` from one folder."""
        folder = Path(folder).expanduser()
        files = {name: folder / name for name in ("model.safetensors", "config.json", "tokenizer.json")}
        missing = [name for name, p in files.items() if not p.is_file()]
        if missing:
            raise ModelFileError(f"{folder}: missing {', '.join(missing)}")
        weights = load_file(str(files["model.safetensors"]))
        return cls(weights, BertConfig.from_json(files["config.json"]),
                   Tokenizer.from_file(str(files["tokenizer.json"])), max_tokens, device)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (token ids of all texts one after another [n_tokens], offsets [n_texts + 1])."""
        encodings = self.tokenizer.encode_batch(list(texts))
        lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64, count=int(offsets[-1]))
        return ids, offsets

    def hidden_states(self, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Packed token ids [n] with their texts' offsets -> last hidden states [n, hidden] (host float32)."""
        ops, w, cfg = self.ops, self.w, self.config
        n = len(ids)
        positions = np.arange(n) - np.repeat(offsets[:-1], np.diff(offsets))
        rows = -(-n // GPU_TOKEN_STEP) * GPU_TOKEN_STEP if self.on_gpu else n
        x = np.zeros((rows, self.dim), dtype=np.float32)  # rows past n: zeros the GPU works on and drops
        x[:n] = self.word[ids] + self.position[positions] + self.token_type
        h = ops.layer_norm(ops.from_host(x), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"],
                           cfg.layer_norm_eps)
        for i in range(cfg.num_layers):
            h = self._layer(h, offsets, f"encoder.layer.{i}.")
        return ops.to_host(h)[:n]

    def _linear(self, x: Any, name: str, gelu: bool = False, residual_norm: tuple[Any, str] | None = None) -> Any:
        """``residual_norm=(h, norm_name)``: then LayerNorm ``norm_name`` of the output + ``h`` (in one kernel on
        the CPU)."""
        norm = None
        if residual_norm is not None:
            residual, norm_name = residual_norm
            norm = (residual, self.w[norm_name + ".weight"], self.w[norm_name + ".bias"], self.config.layer_norm_eps)
        return self.ops.linear(x, self.w[name + ".weight"], self.w[name + ".bias"], gelu, norm)

    def _layer(self, h: Any, offsets: np.ndarray, p: str) -> Any:
        cfg = self.config
        if self.on_gpu:  # the GPU kernel reads q, k and v as arrays of their own
            q, k, v = (self._linear(h, p + f"attention.self.{name}") for name in QKV)
        else:
            qkv = self._linear(h, p + "attention.self.qkv")
            q, k, v = (qkv[:, i * self.dim:(i + 1) * self.dim] for i in range(3))
        context = self.ops.encoder_attention(q, k, v, offsets, cfg.num_heads,
                                             1.0 / float(np.sqrt(cfg.hidden_size // cfg.num_heads)))
        h = self._linear(context, p + "attention.output.dense", residual_norm=(h, p + "attention.output.LayerNorm"))
        return self._linear(self._linear(h, p + "intermediate.dense", gelu=True), p + "output.dense",
                            residual_norm=(h, p + "output.LayerNorm"))

    def encode(self, texts: list[str]) -> np.ndarray:
        """Texts -> unit-length sentence vectors [n, hidden] (float32): mean over each text's tokens, then L2."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_tokens(*self.tokenize(texts))

    def encode_tokens(self, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """``tokenize``'s packed ids and offsets -> unit-length sentence vectors [n_texts, hidden] (float32)."""
        h = self.hidden_states(ids, offsets)
        mean = np.add.reduceat(h, offsets[:-1], axis=0) / np.diff(offsets)[:, None].astype(np.float32)
        norm = np.linalg.norm(mean, axis=1, keepdims=True)
        return (mean / np.maximum(norm, 1e-12)).astype(np.float32)
