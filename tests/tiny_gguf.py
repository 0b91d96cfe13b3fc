"""Write small, valid GGUF model files with gguf's own writer, for tests of formats and architectures
that the two real models do not use. Weights are random, seeded, and quantized by ``gguf.quants``."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize

T = gguf.GGMLQuantizationType
QUANTIZABLE = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4)


def random_blocks(ggml_type: T, rows: int, cols: int, rng: np.random.Generator, scale: float = 0.01) -> np.ndarray:
    """Raw bytes of a (rows, cols) tensor of a type gguf cannot quantize (K-quants, IQ4_NL):
    random bits with every fp16 scale field set to ``scale`` (small and finite: no block decodes to inf/nan)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    scale_bytes = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
    # Offsets of the fp16 super-block scales (d, dmin) inside each block, per ggml's block layouts.
    fp16_fields = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_NL: (0,)}
    for off in fp16_fields[ggml_type]:
        raw[..., off:off + 2] = scale_bytes
    return raw.reshape(rows, -1)


def tensor_bytes(values: np.ndarray, ggml_type: T, rng: np.random.Generator) -> np.ndarray:
    if ggml_type in QUANTIZABLE:
        return quantize(values, ggml_type)
    return random_blocks(ggml_type, values.shape[0], values.shape[1], rng)


def write_model(path: Path, arch: str = "llama", *, n_layers: int = 2, d_model: int = 64, n_heads: int = 4,
                n_kv_heads: int = 2, d_ff: int = 128, vocab: int = 256, weight_type: T = T.F32, seed: int = 0,
                qkv_bias: bool = False, qk_norm: bool = False, rope_scaling: str | None = None,
                skip: tuple[str, ...] = (),
                reshape: dict[str, tuple[int, ...]] | None = None, extra_types: dict[str, T] | None = None,
                tokenizer: bool = False) -> Path:
    """A tiny model of ``arch`` with random weights; ``skip`` leaves tensors out, ``reshape`` gives some a wrong shape;
    ``tokenizer`` adds a SentencePiece vocabulary of ``vocab`` tokens (bytes, then placeholder pieces) so that
    ``rocmforge.load`` opens it."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = d_model // n_heads
    writer.add_block_count(n_layers)
    writer.add_context_length(128)
    writer.add_embedding_length(d_model)
    writer.add_feed_forward_length(d_ff)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    if rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling))
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, d_model), "output_norm.weight": (d_model,),
                                          "output.weight": (vocab, d_model)}
    for i in range(n_layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (d_model,), f"blk.{i}.ffn_norm.weight": (d_model,),
            f"blk.{i}.attn_q.weight": (n_heads * head_dim, d_model), f"blk.{i}.attn_k.weight": (n_kv_heads * head_dim, d_model),
            f"blk.{i}.attn_v.weight": (n_kv_heads * head_dim, d_model), f"blk.{i}.attn_output.weight": (d_model, d_model),
            f"blk.{i}.ffn_gate.weight": (d_ff, d_model), f"blk.{i}.ffn_up.weight": (d_ff, d_model),
            f"blk.{i}.ffn_down.weight": (d_model, d_ff),
        })
        if qkv_bias:
            shapes.update({f"blk.{i}.attn_q.bias": (n_heads * head_dim,), f"blk.{i}.attn_k.bias": (n_kv_heads * head_dim,),
                           f"blk.{i}.attn_v.bias": (n_kv_heads * head_dim,)})
        if qk_norm:
            shapes.update({f"blk.{i}.attn_q_norm.weight": (head_dim,), f"blk.{i}.attn_k_norm.weight": (head_dim,)})
    if tokenizer:
        pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        pieces += [f"\u2581t{i}" for i in range(vocab - len(pieces))]
        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces)
        writer.add_token_scores([0.0] * vocab)
        writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (vocab - 259))
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    shapes.update(reshape or {})
    for name, shape in shapes.items():
        if name in skip:
            continue
        if len(shape) == 1:
            values = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            writer.add_tensor(name, values)
            continue
        values = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        ggml_type = (extra_types or {}).get(name, weight_type)
        writer.add_tensor(name, tensor_bytes(values, ggml_type, rng), raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
