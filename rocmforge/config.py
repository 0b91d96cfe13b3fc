"""GGUF metadata -> a frozen, typed config: every hyperparameter the forward needs.

Defaults follow llama.cpp (``llama-model.cpp`` hparams loading) for keys a file leaves out.

>>> from rocmforge.gguf_file import GGUFFile
>>> from rocmforge.registry import resolve
>>> cfg = GGUFFile(resolve("gemma3-270m")).config  # doctest: +SKIP
>>> cfg.architecture, cfg.n_layers, cfg.is_sliding(0), cfg.is_sliding(5)  # doctest: +SKIP
('gemma3', 18, True, False)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from rocmforge.errors import ModelFileError, UnsupportedError

if TYPE_CHECKING:
    from rocmforge.gguf_file import GGUFFile

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int            # per-head width of queries and keys
    head_dim_v: int          # per-head width of values
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_base: float
    rope_base_local: float   # rope base on sliding-window layers (gemma3: 10,000)
    rope_dims: int           # leading dims of each head that are rotated
    rope_neox: bool          # NeoX rotates (i, i + d/2) pairs; llama rotates adjacent (2i, 2i+1) pairs
    rope_scaling: str        # "none" | "linear"
    rope_scale_factor: float
    attention_scale: float   # multiplies q·k before the softmax
    sliding_window: int      # 0 = every layer attends to the whole context
    sliding_window_pattern: int  # every Nth layer is global (gemma3: 6); 0 = all layers sliding when window > 0
    attn_logit_softcap: float    # 0 = off
    final_logit_softcap: float   # 0 = off
    embedding_scale: float   # gemma multiplies embeddings by sqrt(d_model)
    qkv_bias: bool           # qwen2
    qk_norm: bool            # qwen3, gemma3
    post_norms: bool         # gemma3: extra norms after attention and after the FFN
    tied_embeddings: bool    # no output.weight: the unembedding reuses token_embd
    ffn_activation: str      # "silu" (SwiGLU) | "gelu_tanh" (GeGLU)

    def is_sliding(self, layer: int) -> bool:
        if self.sliding_window <= 0:
            return False
        if self.sliding_window_pattern <= 0:
            return True
        return (layer + 1) % self.sliding_window_pattern != 0

    def rope_base_for(self, layer: int) -> float:
        return self.rope_base_local if self.is_sliding(layer) else self.rope_base

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_gguf(cls, gguf: "GGUFFile") -> "ModelConfig":
        md, arch = gguf.metadata, gguf.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedError(
                f"{gguf.path.name}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

        def key(name: str, default: Any = None, required: bool = False) -> Any:
            full = f"{arch}.{name}"
            if full in md:
                value = md[full]
                return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value
            if required:
                raise ModelFileError(f"{gguf.path.name}: missing metadata key {full!r}")
            return default

        d_model = int(key("embedding_length", required=True))
        n_heads = int(key("attention.head_count", required=True))
        head_dim = int(key("attention.key_length", d_model // n_heads))
        tensors = gguf.tensors
        vocab = key("vocab_size")
        if vocab is None:
            vocab = gguf.array_length("tokenizer.ggml.tokens") if "tokenizer.ggml.tokens" in md else tensors["token_embd.weight"].shape[0]
        gemma = arch == "gemma3"
        scaling = str(key("rope.scaling.type", "none"))
        if scaling not in ("none", "linear"):  # llama3 factors come as the rope_freqs.weight tensor, not a type
            raise UnsupportedError(f"{gguf.path.name}: rope scaling {scaling!r} is not supported")
        cfg = cls(
            architecture=arch,
            n_layers=int(key("block_count", required=True)),
            d_model=d_model,
            d_ff=int(key("feed_forward_length", required=True)),
            n_heads=n_heads,
            n_kv_heads=int(key("attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            head_dim_v=int(key("attention.value_length", head_dim)),
            vocab_size=int(vocab),
            context_length=int(key("context_length", 2048)),
            norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6 if gemma else 1e-5)),
            rope_base=float(key("rope.freq_base", 10000.0)),
            rope_base_local=10000.0 if gemma else float(key("rope.freq_base", 10000.0)),
            rope_dims=int(key("rope.dimension_count", head_dim)),
            rope_neox=arch in ("qwen2", "qwen3", "gemma3"),
            rope_scaling=scaling,
            rope_scale_factor=float(key("rope.scaling.factor", 1.0)),
            attention_scale=1.0 / math.sqrt(head_dim),
            sliding_window=int(key("attention.sliding_window", 0)) if gemma else 0,
            sliding_window_pattern=6 if gemma else 0,
            attn_logit_softcap=float(key("attn_logit_softcapping", 0.0)),
            final_logit_softcap=float(key("final_logit_softcapping", 0.0)),
            embedding_scale=math.sqrt(d_model) if gemma else 1.0,
            qkv_bias="blk.0.attn_q.bias" in tensors,
            qk_norm="blk.0.attn_q_norm.weight" in tensors,
            post_norms="blk.0.post_attention_norm.weight" in tensors,
            tied_embeddings="output.weight" not in tensors,
            ffn_activation="gelu_tanh" if gemma else "silu",
        )
        cfg.check_tensors(gguf)
        return cfg

    def expected_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Logical (rows, cols) shapes of one block's weights: rows = output features."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        v = self.n_kv_heads * self.head_dim_v
        shapes = {
            f"blk.{layer}.attn_norm.weight": (self.d_model,),
            f"blk.{layer}.attn_q.weight": (q, self.d_model),
            f"blk.{layer}.attn_k.weight": (kv, self.d_model),
            f"blk.{layer}.attn_v.weight": (v, self.d_model),
            f"blk.{layer}.attn_output.weight": (self.d_model, self.n_heads * self.head_dim_v),
            f"blk.{layer}.ffn_norm.weight": (self.d_model,),
            f"blk.{layer}.ffn_gate.weight": (self.d_ff, self.d_model),
            f"blk.{layer}.ffn_up.weight": (self.d_ff, self.d_model),
            f"blk.{layer}.ffn_down.weight": (self.d_model, self.d_ff),
        }
        if self.qkv_bias:
            shapes.update({f"blk.{layer}.attn_q.bias": (q,), f"blk.{layer}.attn_k.bias": (kv,),
                           f"blk.{layer}.attn_v.bias": (v,)})
        if self.qk_norm:
            shapes.update({f"blk.{layer}.attn_q_norm.weight": (self.head_dim,),
                           f"blk.{layer}.attn_k_norm.weight": (self.head_dim,)})
        if self.post_norms:
            shapes.update({f"blk.{layer}.post_attention_norm.weight": (self.d_model,),
                           f"blk.{layer}.post_ffw_norm.weight": (self.d_model,)})
        return shapes

    def check_tensors(self, gguf: "GGUFFile") -> None:
        """Every tensor the forward reads exists and has the shape the config implies."""
        expected = {"token_embd.weight": (self.vocab_size, self.d_model), "output_norm.weight": (self.d_model,)}
        if not self.tied_embeddings:
            expected["output.weight"] = (self.vocab_size, self.d_model)
        for layer in range(self.n_layers):
            expected.update(self.expected_shapes(layer))
        for name, shape in expected.items():
            ref = gguf.tensors.get(name)
            if ref is None:
                raise ModelFileError(f"{gguf.path.name}: missing tensor {name!r}")
            if tuple(ref.shape) != shape:
                raise ModelFileError(
                    f"{gguf.path.name}: tensor {name} has shape {tuple(ref.shape)} but the config implies {shape}")
            if not can_dequantize(ref.ggml_type):
                raise UnsupportedError(
                    f"{gguf.path.name}: tensor {name} uses quantization type {ref.ggml_type.name}, "
                    "which gguf cannot dequantize")


@lru_cache(maxsize=None)
def can_dequantize(ggml_type: GGMLQuantizationType) -> bool:
    """Whether ``gguf.quants.dequantize`` handles this type (asked of gguf itself with one zero block)."""
    block, nbytes = GGML_QUANT_SIZES[ggml_type]
    try:
        dequantize(np.zeros((1, nbytes), dtype=np.uint8), ggml_type)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True
