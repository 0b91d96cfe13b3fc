"""GGUF tensors -> the weight handles a backend multiplies with, grouped the way the forward reads them.

On CPU every matrix is dequantized once to float32 (``gguf.quants.dequantize``); a GPU backend keeps the raw
blocks on the device. Block tensors are found by their GGUF names ``blk.{i}.<name>.weight|bias`` and exposed
under ``<name>`` (weights) and ``<name>_bias`` (biases), e.g. ``weights.blocks[3]["attn_q"]``.

>>> from rocmforge.gguf_file import GGUFFile
>>> from rocmforge.backends.cpu import CpuBackend
>>> from rocmforge.registry import resolve
>>> w = Weights.load(GGUFFile(resolve("smollm2-135m")), CpuBackend())  # doctest: +SKIP
>>> w.blocks[0]["attn_q"].shape  # doctest: +SKIP
(576, 576)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from rocmforge.gguf_file import GGUFFile

_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


@dataclass
class Weights:
    token_embd: Any          # lookup table [vocab, d_model]
    output: Any              # unembedding [vocab, d_model] (the same handle as token_embd when tied)
    output_norm: Any         # [d_model]
    rope_freqs: Any | None   # llama3 per-frequency rope factors, when the file has them
    blocks: list[dict[str, Any]]

    @classmethod
    def load(cls, gguf: GGUFFile, ops: Any) -> "Weights":
        cfg, tensors = gguf.config, gguf.tensors
        token_embd = ops.load_embedding(tensors["token_embd.weight"], tied=cfg.tied_embeddings)
        output = token_embd if cfg.tied_embeddings else ops.load_weight(tensors["output.weight"])
        rope_freqs = ops.load_vector(tensors["rope_freqs.weight"]) if "rope_freqs.weight" in tensors else None
        blocks: list[dict[str, Any]] = [{} for _ in range(cfg.n_layers)]
        for name, ref in tensors.items():
            match = _BLOCK_TENSOR.match(name)
            if match is None:
                continue
            layer, short, kind = int(match[1]), match[2], match[3]
            key = short if kind == "weight" else f"{short}_bias"
            blocks[layer][key] = ops.load_vector(ref) if len(ref.shape) == 1 else ops.load_weight(ref)
        return cls(token_embd, output, ops.load_vector(tensors["output_norm.weight"]), rope_freqs, blocks)
