"""GGUF loading: real files against gguf's own reader, every weight type, and every bad-input error."""
from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from rocmforge.config import ModelConfig
from rocmforge.errors import ModelFileError, UnsupportedError
from rocmforge.gguf_file import GGUFFile
from tiny_gguf import QUANTIZABLE, T, write_model


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return GGUFFile(smollm2_path), gguf.GGUFReader(smollm2_path)


def test_metadata_matches_gguf_reader(smol):
    fast, stock = smol
    assert set(fast.metadata.keys()) == set(stock.fields.keys())
    tokens = fast.metadata["tokenizer.ggml.tokens"]
    field = stock.fields["tokenizer.ggml.tokens"]
    assert len(tokens) == len(field.data) == 49152
    for i in (0, 1, 2, 100, 4000, 49151):
        assert tokens[i] == bytes(field.parts[field.data[i]]).decode()
    merges = fast.metadata["tokenizer.ggml.merges"]
    assert len(merges) == 48900 and merges[0] == "Ġ t"
    np.testing.assert_array_equal(fast.metadata["tokenizer.ggml.token_type"],
                                  np.array([stock.fields["tokenizer.ggml.token_type"].parts[j][0]
                                            for j in stock.fields["tokenizer.ggml.token_type"].data]))
    assert fast.metadata["llama.rope.freq_base"] == pytest.approx(100000.0)
    assert fast.array_length("tokenizer.ggml.merges") == 48900


def test_tensors_are_memory_mapped_and_dequantize_like_gguf(smol):
    fast, stock = smol
    assert len(fast.tensors) == len(stock.tensors) == 272
    ref = fast.tensors["token_embd.weight"]
    assert ref.ggml_type == T.Q8_0 and ref.shape == (49152, 576)
    # A view into the file's memory map, not a copy.
    assert isinstance(ref.raw.base, np.memmap) or isinstance(ref.raw, np.memmap)
    stock_t = next(t for t in stock.tensors if t.name == "blk.3.ffn_down.weight")
    np.testing.assert_array_equal(fast.dequantize("blk.3.ffn_down.weight"),
                                  dequantize(stock_t.data, stock_t.tensor_type).reshape(576, 1536))


def test_smollm2_config(smol):
    cfg = smol[0].config
    assert (cfg.architecture, cfg.n_layers, cfg.d_model, cfg.d_ff) == ("llama", 30, 576, 1536)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tied_embeddings and not cfg.rope_neox and cfg.context_length == 8192
    assert cfg.attention_scale == pytest.approx(1 / 8)


def test_gemma3_config(gemma3_path):
    cfg = GGUFFile(gemma3_path).config
    assert (cfg.architecture, cfg.n_layers, cfg.head_dim, cfg.n_kv_heads) == ("gemma3", 18, 256, 1)
    assert cfg.sliding_window == 512 and cfg.qk_norm and cfg.post_norms and cfg.rope_neox
    assert [i for i in range(18) if not cfg.is_sliding(i)] == [5, 11, 17]
    assert cfg.rope_base_for(5) == 1e6 and cfg.rope_base_for(0) == 1e4
    assert cfg.embedding_scale == pytest.approx(640 ** 0.5) and cfg.ffn_activation == "gelu_tanh"


@pytest.mark.parametrize("ggml_type", [*QUANTIZABLE, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL])
def test_every_weight_type_loads(tmp_path, ggml_type):
    path = write_model(tmp_path / "m.gguf", weight_type=ggml_type, d_model=256, d_ff=256, n_heads=4, vocab=256)
    f = GGUFFile(path)
    cfg = f.config
    assert cfg.d_model == 256
    ref = f.tensors["blk.1.ffn_up.weight"]
    assert ref.ggml_type == ggml_type
    stock = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.ffn_up.weight")
    got = f.dequantize("blk.1.ffn_up.weight")
    assert got.shape == (256, 256) and got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_array_equal(got, dequantize(stock.data, stock.tensor_type).reshape(256, 256))


def test_quantized_weights_stay_near_their_source(tmp_path):
    """Q8_0 of the writer's random weights dequantizes to within Q8_0's rounding step of the f32 file."""
    f32 = GGUFFile(write_model(tmp_path / "a.gguf", weight_type=T.F32, seed=3))
    q8 = GGUFFile(write_model(tmp_path / "b.gguf", weight_type=T.Q8_0, seed=3))
    a, b = f32.dequantize("blk.0.attn_q.weight"), q8.dequantize("blk.0.attn_q.weight")
    step = np.abs(a).reshape(a.shape[0], -1, 32).max(axis=2, keepdims=True) / 127
    # half a rounding step, plus the fp16 rounding of the block scale (127 * 2**-11 steps)
    assert np.all(np.abs(a - b).reshape(a.shape[0], -1, 32) <= step * (0.5 + 127 * 2.0**-11))


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        GGUFFile(bad)
    with pytest.raises(ModelFileError, match="no such file"):
        GGUFFile(tmp_path / "missing.gguf")


def test_truncated_file_names_the_tensor(tmp_path, smollm2_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(60_000_000))
    with pytest.raises(ModelFileError, match=r"truncated file: tensor \S+ needs bytes up to"):
        GGUFFile(cut)
    header_only = tmp_path / "head.gguf"
    with open(smollm2_path, "rb") as src, open(header_only, "wb") as dst:
        dst.write(src.read(100_000))  # cut inside the tokenizer arrays
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        GGUFFile(header_only)


def test_unknown_architecture(tmp_path):
    path = write_model(tmp_path / "m.gguf", arch="mamba")
    with pytest.raises(UnsupportedError, match="architecture 'mamba' is not supported"):
        GGUFFile(path).config


def test_rope_scaling_the_forward_cannot_run_is_refused_at_load(tmp_path):
    with pytest.raises(UnsupportedError, match="rope scaling 'yarn' is not supported"):
        GGUFFile(write_model(tmp_path / "y.gguf", rope_scaling="yarn")).config
    assert GGUFFile(write_model(tmp_path / "l.gguf", rope_scaling="linear")).config.rope_scaling == "linear"


def test_missing_tensor_and_wrong_shape(tmp_path):
    with pytest.raises(ModelFileError, match="missing tensor 'blk.1.ffn_up.weight'"):
        GGUFFile(write_model(tmp_path / "a.gguf", skip=("blk.1.ffn_up.weight",))).config
    with pytest.raises(ModelFileError, match=r"blk.0.attn_k.weight has shape \(64, 64\) but the config implies \(32, 64\)"):
        GGUFFile(write_model(tmp_path / "b.gguf", reshape={"blk.0.attn_k.weight": (64, 64)})).config


def test_type_gguf_cannot_dequantize_is_named(tmp_path):
    path = tmp_path / "q8k.gguf"
    write_model(path, d_model=256, d_ff=256, n_heads=4)
    # Relabel one tensor as Q8_K, which gguf has no dequantizer for (same block bytes are not needed to fail).
    reader = gguf.GGUFReader(path, "r+")
    field = next(t for t in reader.tensors if t.name == "blk.0.ffn_gate.weight").field
    field.parts[4][0] = T.Q8_K  # raw_dtype part of the tensor-info record
    reader.data.flush()
    del reader
    with pytest.raises((UnsupportedError, ModelFileError), match="Q8_K"):
        GGUFFile(path).config


def test_gguf_copy_is_independent_of_cache(tmp_path, smollm2_path):
    """Any local .gguf path works, not only cached registry files."""
    local = tmp_path / "mine.gguf"
    shutil.copy(smollm2_path, local)
    assert ModelConfig.from_gguf(GGUFFile(local)).n_layers == 30
