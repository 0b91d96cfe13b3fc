"""GGUF tensors -> the weight handles a backend multiplies with, grouped the way the forward reads them.

On CPU every matrix is dequantized once to float32 (``gguf.quants.dequantize``); a GPU backend keeps the raw
blocks on the device. Block tensors are found by their GGUF names ``blk.{i}.<name>.weight|bias`` and exposed
under ``<name>`` (weights) and ``<name>_bias`` (biases), e.g. ``weights.blocks[3]["attn_q"]``, one handle per
tensor even when the backend stores a ``SHARED_INPUT`` group together.

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

from rocmforge.gguf_file import GGUFFile, TensorRef

_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
# weights that multiply the same activation; a backend with ``load_weight_group`` (the CPU one) may store each
# group as one matrix, so a decode step runs one matrix-vector product per group instead of one per weight
SHARED_INPUT = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))


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
        refs: list[dict[str, TensorRef]] = [{} for _ in range(cfg.n_layers)]
        for name, ref in tensors.items():
            match = _BLOCK_TENSOR.match(name)
            if match is not None:
                refs[int(match[1])][match[2] if match[3] == "weight" else f"{match[2]}_bias"] = ref
        blocks = [_load_block(layer_refs, ops) for layer_refs in refs]
        return cls(token_embd, output, ops.load_vector(tensors["output_norm.weight"]), rope_freqs, blocks)


def _load_block(refs: dict[str, TensorRef], ops: Any) -> dict[str, Any]:
    block: dict[str, Any] = {}
    load_group = getattr(ops, "load_weight_group", None)
    for group in SHARED_INPUT if load_group else ():
        if all(key in refs for key in group):
            block.update(zip(group, load_group([refs[key] for key in group])))
    for key, ref in refs.items():
        if key not in block:
            block[key] = ops.load_vector(ref) if len(ref.shape) == 1 else ops.load_weight(ref)
    return block
