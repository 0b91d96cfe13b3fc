"""rocmforge.tokenizer against llama.cpp: fixtures written by tests/fixtures/make_tokenizer_fixtures.py."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import pytest

from rocmforge.errors import UnsupportedError
from rocmforge.gguf_file import GGUFFile
from rocmforge.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
VOCABS = ["smollm2", "gemma3", "smollm2_llama3", "smollm2_qwen2", "smollm2_gpt2", "gemma3_space_prefix"]
REFERENCE = {name: json.loads((FIXTURES / f"tokenizer_{name}.json").read_text()) for name in VOCABS}
CASES = [(vocab, case) for vocab in VOCABS for case in REFERENCE[vocab]["cases"]]


@pytest.fixture(scope="module")
def metadata(smollm2_path, gemma3_path) -> dict[str, dict]:
    """Both real files' metadata as plain dicts (every array decoded once)."""
    out = {}
    for model, path in (("smollm2", smollm2_path), ("gemma3", gemma3_path)):
        meta = GGUFFile(path).metadata
        out[model] = {key: meta[key] for key in meta.keys()}
    return out


@pytest.fixture(scope="module")
def tokenizers(metadata) -> dict[str, Tokenizer]:
    """The real vocabs, and the variants the fixture script wrote (same vocab, other metadata)."""
    out = {}
    for vocab in VOCABS:
        ref = REFERENCE[vocab]
        source = ref.get("source", "smollm2-135m" if vocab == "smollm2" else "gemma3-270m").split("-")[0]
        meta = {k: v for k, v in metadata[source].items() if k not in ref.get("dropped", [])}
        meta.update(ref.get("overrides", {}))
        out[vocab] = Tokenizer(meta)
    return out


@pytest.mark.parametrize("vocab,case", CASES)
def test_ids_match_llama_cpp(tokenizers, vocab, case):
    tok, ref = tokenizers[vocab], REFERENCE[vocab]["cases"][case]
    assert tok.encode(ref["text"], add_bos=False) == ref["ids"]
    assert tok.encode(ref["text"]) == ref["ids_add_special"]  # the file's own BOS/EOS choice
    assert tok.encode(ref["text"], add_bos=False, special=False) == ref["ids_no_special"]


@pytest.mark.parametrize("vocab,case", CASES)
def test_decode_matches_llama_cpp(tokenizers, vocab, case):
    tok, ref = tokenizers[vocab], REFERENCE[vocab]["cases"][case]
    assert tok.decode(ref["ids"]) == ref["detokenized"]
    assert tok.decode(ref["ids"], special=False) == ref["detokenized_no_special"]
    if ref["round_trips"]:
        assert tok.decode(tok.encode(ref["text"], add_bos=False)) == ref["text"]


@pytest.mark.parametrize("vocab", VOCABS)
def test_special_ids_and_pieces_match_llama_cpp(tokenizers, vocab):
    tok, ref = tokenizers[vocab], REFERENCE[vocab]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (ref["n_tokens"], ref["bos"], ref["eos"],
                                                                    ref["add_bos"])
    assert sorted(tok.eot_ids) == ref["eog_ids"]
    digest = hashlib.sha256()
    for tid in range(tok.vocab_size):
        piece = tok.token_bytes(tid)
        digest.update(len(piece).to_bytes(4, "little") + piece)
    assert digest.hexdigest() == ref["pieces_sha256"]


@pytest.mark.parametrize("vocab", ["smollm2", "gemma3"])
def test_add_bos_true_always_prepends_bos(tokenizers, vocab):
    tok, ref = tokenizers[vocab], REFERENCE[vocab]["cases"]["prose"]
    assert tok.encode(ref["text"], add_bos=True) == [tok.bos_id] + ref["ids"]


@pytest.mark.parametrize("vocab", ["smollm2", "gemma3"])
def test_incremental_decoder_never_splits_a_character(tokenizers, vocab):
    tok = tokenizers[vocab]
    held_back = 0
    for case, ref in REFERENCE[vocab]["cases"].items():
        decoder = tok.incremental_decoder()
        pieces = [decoder.feed(tid) for tid in ref["ids"]]
        pieces.append(decoder.flush())
        assert "".join(pieces) == tok.decode(ref["ids"]), case
        assert not any("\ufffd" in piece for piece in pieces), case
        held_back += sum(1 for tid, piece in zip(ref["ids"], pieces) if tok.token_bytes(tid) and not piece)
    assert held_back > 0  # the corpus did split characters across tokens (emoji, CJK)


def test_token_text_for_display(tokenizers):
    smollm2, gemma3 = tokenizers["smollm2"], tokenizers["gemma3"]
    assert smollm2.token_text(smollm2.encode(" world")[0]) == " world"
    assert smollm2.token_text(1) == "<|im_start|>"
    assert gemma3.token_text(gemma3.encode("Hi there", add_bos=False)[1]) == " there"
    assert gemma3.token_text(gemma3.encode("\U0001f999", add_bos=False)[0]) == "\ufffd"  # first byte of 4


def _tiny_gguf(path: Path, model: str, pre: str) -> Path:
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_types([1, 1, 1])
    writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    with pytest.raises(UnsupportedError, match="pre-tokenizer 'made-up-pre'"):
        Tokenizer.from_gguf(_tiny_gguf(tmp_path / "tiny.gguf", "gpt2", "made-up-pre"))


def test_tiny_gguf_with_a_known_pre_tokenizer_builds(tmp_path):
    tok = Tokenizer.from_gguf(_tiny_gguf(tmp_path / "tiny.gguf", "gpt2", "gpt-2"))
    assert tok.encode("abab") == [2, 2]


def test_unknown_tokenizer_model_is_refused(tmp_path):
    with pytest.raises(UnsupportedError, match="tokenizer model 'bert'"):
        Tokenizer.from_gguf(_tiny_gguf(tmp_path / "tiny.gguf", "bert", "default"))
