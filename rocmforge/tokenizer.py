"""Text <-> token ids from a GGUF file's metadata alone, reproducing llama.cpp (src/llama-vocab.cpp).

Encoding runs in the same three steps as llama.cpp:

1. Split the text around special tokens (control and user-defined tokens), longest token first
   (``tokenizer_st_partition``). Control tokens are matched only when ``special=True``.
2. Tokenize each plain-text fragment with the vocab's model:
   - ``gpt2``: byte-level BPE. ``tokenizer.ggml.pre`` picks the pre-tokenizer regexes exactly as
     llama.cpp does; the `tokenizers` library runs the regex splits and the merges.
   - ``llama``: SentencePiece-style (Gemma 3). Spaces become ``▁`` and the adjacent pair whose
     concatenation is the highest-scoring token is merged until none is left; characters that no
     token covers become ``<0xXX>`` byte tokens. This is a small loop in Python: the `tokenizers`
     BPE merges by rank, and deriving ranks from Gemma's 262k scores takes over 10 s.
3. Add BOS/EOS as the file asks (``tokenizer.ggml.add_bos_token`` / ``add_eos_token``).

Example:
    >>> from rocmforge.registry import resolve
    >>> tok = Tokenizer.from_gguf(resolve("smollm2-135m"))
    >>> tok.encode("Hello world")
    [19556, 905]
    >>> tok.decode([19556, 905])
    'Hello world'
"""
from __future__ import annotations

import heapq
import os
import re
from array import array
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from rocmforge.errors import ModelFileError, UnsupportedError
from rocmforge.gguf_file import GGUFFile

# llama_token_attr bits (llama.h) and the GGUF token_type each maps to.
ATTR_UNKNOWN, ATTR_UNUSED, ATTR_NORMAL, ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_BYTE = 1, 2, 4, 8, 16, 32
_TOKEN_TYPE_TO_ATTR = {0: 0, 1: ATTR_NORMAL, 2: ATTR_UNKNOWN, 3: ATTR_CONTROL, 4: ATTR_USER_DEFINED,
                       5: ATTR_UNUSED, 6: ATTR_BYTE}

# Pre-tokenizer regexes, verbatim from llm_tokenizer_bpe in llama-vocab.cpp.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
                 r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
                r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class _BpeTexts:
    """Token id -> text from the ``tokenizers`` BPE model, which holds the vocabulary anyway: a list of the texts
    beside it (and the metadata's copy) would keep SmolLM2's 49k strings twice more, ~6 MiB for the model's life."""

    def __init__(self, bpe: HFTokenizer, tokens: list[str], token_to_id: dict[str, int]):
        self._id_to_token = bpe.id_to_token
        # a text listed under several ids: the model knows it by its last id, so the earlier ones are kept here
        self._shadowed = {} if len(token_to_id) == len(tokens) else \
            {i: text for i, text in enumerate(tokens) if token_to_id[text] != i}

    def __getitem__(self, token_id: int) -> str:
        text = self._shadowed.get(token_id)
        return self._id_to_token(token_id) if text is None else text


@dataclass(frozen=True)
class _PreTokenizer:
    regexes: tuple[str, ...]
    clean_spaces: bool = True     # llama_detokenize's " ." / " 's" clean-up pass
    ignore_merges: bool = False   # a pre-token that is itself in the vocab is emitted whole
    add_bos: bool = False         # default before tokenizer.ggml.add_bos_token overrides it


_SMOLLM = (r"\p{N}", _GPT2_REGEX)
# tokenizer.ggml.pre -> pre-tokenizer, grouped as llama.cpp's llama_vocab::impl::load groups them.
# Only the regex families checked against llama.cpp fixtures are listed; any other name is refused.
_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"], _PreTokenizer((_LLAMA3_REGEX,), ignore_merges=True, add_bos=True)),
    **dict.fromkeys(["smollm", "command-r"], _PreTokenizer(_SMOLLM, clean_spaces=False)),
    **dict.fromkeys(["starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"],
                    _PreTokenizer(_SMOLLM)),
    **dict.fromkeys(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                     "mellum", "modern-bert", "mpt", "olmo", "jais", "exaone4"], _PreTokenizer((_GPT2_REGEX,))),
    "trillion": _PreTokenizer((_GPT2_REGEX,), clean_spaces=False),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2"],
                    _PreTokenizer((_QWEN2_REGEX,), clean_spaces=False)),
    **dict.fromkeys(["megrez", "stablelm2"], _PreTokenizer((_QWEN2_REGEX,))),
}

# Tokens that end generation, found by their text (llama.cpp does the same: ggml-org/llama.cpp#9606).
_EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
])
# Fill-in-the-middle tokens, by metadata key or else by text. llama.cpp makes them control tokens, and
# the pad / repo / sep ones (last three) also end generation.
_FIM_TOKENS = {
    "tokenizer.ggml.fim_pre_token_id": ["<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                                        "▁<PRE>", "<|code_prefix|>", "<|prefix|>"],
    "tokenizer.ggml.fim_suf_token_id": ["<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                                        "▁<SUF>", "<|code_suffix|>", "<|suffix|>"],
    "tokenizer.ggml.fim_mid_token_id": ["<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                                        "▁<MID>", "<|code_middle|>", "<|middle|>"],
    "tokenizer.ggml.fim_pad_token_id": ["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    "tokenizer.ggml.fim_rep_token_id": ["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"],
    "tokenizer.ggml.fim_sep_token_id": ["<|file_sep|>"],
}
_FIM_EOG_KEYS = ("tokenizer.ggml.fim_pad_token_id", "tokenizer.ggml.fim_rep_token_id",
                 "tokenizer.ggml.fim_sep_token_id")
# gpt-oss tokens llama.cpp always prints (it makes them user-defined).
_ALWAYS_PRINTED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_UNICODE_TO_BYTE = {ch: bytes([b]) for b, ch in _bytes_to_unicode().items()}


def _byte_level_decode(text: str) -> bytes:
    """A byte-level BPE token's bytes: each character stands for one byte (llama_decode_text, including
    its marker for a character outside the map)."""
    return b"".join(_UNICODE_TO_BYTE.get(ch) or f"[UNK_BYTE_0x{ch.encode().hex()}{text}]".encode() for ch in text)


def _longest_match_regex(words: Iterable[str]) -> re.Pattern[str]:
    """A regex finding, at every position, the longest of `words` starting there.

    The alternation is nested as a trie, so a failed position costs one character test instead of
    one test per word (Gemma has 6,400 special tokens)."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        branches = [re.escape(ch) + build(child) for ch, child in node.items() if ch != ""]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return re.compile(f"(?=({build(trie)}))")


def _clean_up_spaces(text: bytes) -> bytes:
    """llama_detokenize's clean-up for BPE vocabs with clean_spaces (three passes over the bytes)."""
    out = bytearray()
    for i, x in enumerate(text):  # " ?", " !", " .", " ," lose the space
        if i > 0 and text[i - 1] == 0x20 and x in b"?!.,":
            out.pop()
        out.append(x)
    src, out, i = bytearray(out), bytearray(), 0
    while i < len(src):  # " ' " -> "'"
        x = src[i]
        if x == 0x27 and 0 < i and i + 1 < len(src) and src[i - 1] == 0x20 and src[i + 1] == 0x20:
            out.pop()
            src[i + 1] = 0  # llama.cpp blanks the dropped space, so the next char no longer sees it
            out.append(x)
            i += 2
            continue
        out.append(x)
        i += 1
    src, out = bytes(out), bytearray()
    for i, x in enumerate(src):  # " 's", " 'm", " 're", " 've" lose the space
        if i > 0 and src[i - 1] == 0x20 and x == 0x27 and i + 1 < len(src):
            if src[i + 1] in b"sm" or (i + 2 < len(src) and src[i + 1:i + 3] in (b"re", b"ve")):
                out.pop()
        out.append(x)
    return bytes(out)


class Tokenizer:
    """A GGUF file's tokenizer, encoding and decoding exactly as llama.cpp does.

    Attributes: ``vocab_size``, ``bos_id`` / ``eos_id`` (int or None), ``eot_ids`` (every id that ends
    generation: EOS, end-of-turn tokens such as ``<|im_end|>`` / ``<end_of_turn>``), ``add_bos``
    (the file's default), ``chat_template`` (str or None) and ``architecture``.

    Example:
        >>> from rocmforge.registry import resolve
        >>> tok = Tokenizer.from_gguf(resolve("gemma3-270m"))
        >>> tok.encode("Hi there")
        [2, 10979, 993]
        >>> tok.token_text(2), tok.bos_id, [tok.token_text(i) for i in sorted(tok.eot_ids)]
        ('<bos>', 2, ['<eos>', '<end_of_turn>', '</s>'])
    """

    def __init__(self, metadata: Mapping[str, Any]):
        """Build from GGUF metadata (a dict of ``tokenizer.ggml.*`` keys); see :meth:`from_gguf`."""
        model = metadata.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise UnsupportedError(f"tokenizer model {model!r} is not supported (supported: 'gpt2' byte-level "
                                   f"BPE, 'llama' SentencePiece)")
        if "tokenizer.ggml.tokens" not in metadata:
            raise ModelFileError("the file has no tokenizer.ggml.tokens: cannot build a tokenizer")
        self.model: str = model
        tokens = metadata["tokenizer.ggml.tokens"]
        tokens = tokens if isinstance(tokens, list) else list(tokens)
        self.vocab_size: int = len(tokens)
        token_to_id = {text: i for i, text in enumerate(tokens)}
        # id -> text and text -> id (None when absent): the list and dict here, or the BPE model's own vocabulary
        self._texts: _BpeTexts | list[str] = tokens
        self._id_of: Callable[[str], int | None] = token_to_id.get
        self.architecture: str = str(metadata.get("general.architecture", "unknown"))
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")

        if model == "gpt2":
            pre_name = metadata.get("tokenizer.ggml.pre")
            if pre_name not in _PRE_TOKENIZERS:
                raise UnsupportedError(f"pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) is not supported; "
                                       f"supported: {', '.join(sorted(_PRE_TOKENIZERS))}")
            pre = _PRE_TOKENIZERS[pre_name]
            self.pre_tokenizer: str = pre_name
            self._cleans_spaces, add_bos, bos_default, eos_default = pre.clean_spaces, pre.add_bos, 11, 11
            if "tokenizer.ggml.merges" not in metadata:
                raise ModelFileError("the file's BPE vocabulary has no tokenizer.ggml.merges")
            self._bpe = self._build_bpe(token_to_id, metadata["tokenizer.ggml.merges"], pre)
            self._texts, self._id_of = _BpeTexts(self._bpe, tokens, token_to_id), self._bpe.token_to_id
        else:  # llama.cpp ignores tokenizer.ggml.pre for SentencePiece vocabs
            self.pre_tokenizer = "default"
            self._cleans_spaces, add_bos, bos_default, eos_default = False, True, 1, 2
            scores = metadata.get("tokenizer.ggml.scores")
            # float32 scores in 4 bytes each (a list of floats: 32; Gemma's 262k vocab 8 MB -> 1 MB)
            self._scores = array("f", np.zeros(self.vocab_size, np.float32) if scores is None
                                 else np.asarray(scores, np.float32))

        self.add_bos: bool = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos))
        self.add_eos: bool = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        self.add_space_prefix: bool = bool(metadata.get("tokenizer.ggml.add_space_prefix", model == "llama"))
        self.bos_id: int | None = self._special_id(metadata, "tokenizer.ggml.bos_token_id", bos_default)
        self.eos_id: int | None = self._special_id(metadata, "tokenizer.ggml.eos_token_id", eos_default)

        types = metadata.get("tokenizer.ggml.token_type")
        types = np.ones(self.vocab_size, np.int32) if types is None else np.asarray(types)
        self._attrs = bytearray(_TOKEN_TYPE_TO_ATTR.get(t, 0) for t in types.tolist())  # one byte per token
        self.eot_ids: frozenset[int] = self._find_end_of_generation(metadata)

        # Special tokens in llama.cpp's matching order: longest (in UTF-8 bytes) first.
        special = [i for i, a in enumerate(self._attrs) if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)]
        self._special_ids = sorted(special, key=lambda i: (-len(self._texts[i].encode()), i))
        texts = {self._texts[i] for i in special}
        self._special_regex = _longest_match_regex(texts) if texts else None
        # Every special text that is a prefix of another: finding the longest match at a position
        # then tells which shorter special tokens also occur there.
        self._special_prefixes = {t: [t[:k] for k in range(1, len(t) + 1) if t[:k] in texts] for t in texts}

    @classmethod
    def from_gguf(cls, gguf_file: Any) -> Tokenizer:
        """Build from an open ``rocmforge.gguf_file.GGUFFile`` or a path to a .gguf file.

        Example:
            >>> from rocmforge.registry import resolve
            >>> Tokenizer.from_gguf(resolve("smollm2-135m")).vocab_size
            49152
        """
        if isinstance(gguf_file, (str, os.PathLike)):
            gguf_file = GGUFFile(gguf_file)
        return cls(gguf_file.metadata)

    # ----------------------------------------------------------------------------------------- setup
    def _special_id(self, metadata: Mapping[str, Any], key: str, default: int) -> int | None:
        value = int(metadata.get(key, default))
        return value if 0 <= value < self.vocab_size else None

    def _build_bpe(self, token_to_id: dict[str, int], merges: Iterable[str], pre: _PreTokenizer) -> HFTokenizer:
        pairs = []
        for merge in merges:
            split = merge.find(" ", 1)  # llama.cpp splits at the first space after the first byte
            pairs.append((merge[:split], merge[split + 1:]))
        bpe = HFTokenizer(models.BPE(token_to_id, pairs, ignore_merges=pre.ignore_merges))
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return bpe

    def _find_end_of_generation(self, metadata: Mapping[str, Any]) -> frozenset[int]:
        """llama.cpp's special_eog_ids: EOS, EOT/EOM and FIM pad/repo/sep ids, plus every token whose text
        is a known end-of-generation marker. Marks the tokens found by text as control tokens, as
        llama.cpp does (so they are matched whole in text and hidden when decoding without specials)."""
        eog: set[int] = {self.eos_id} if self.eos_id is not None else set()
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            if (tid := self._special_id(metadata, key, -1)) is not None:
                eog.add(tid)
        for key, texts in _FIM_TOKENS.items():
            tid = self._special_id(metadata, key, -1)
            if tid is None:
                tid = next((found for t in texts if (found := self._id_of(t)) is not None), None)
                if tid is not None:
                    self._attrs[tid] |= ATTR_CONTROL
            if tid is not None and key in _FIM_EOG_KEYS:
                eog.add(tid)
        for text in _EOG_TEXTS:
            if (tid := self._id_of(text)) is not None:
                eog.add(tid)
                self._attrs[tid] |= ATTR_CONTROL
        for text in _ALWAYS_PRINTED:
            if (tid := self._id_of(text)) is not None:
                self._attrs[tid] = ATTR_USER_DEFINED
        texts = {self._texts[i]: i for i in eog}
        # gpt-oss / solar-open: "<|end|>" closes a message but not the generation.
        if "<|end|>" in texts and (("<|return|>" in texts and "<|call|>" in texts)
                                   or ("<|calls|>" in texts and "<|flush|>" in texts)):
            eog.discard(texts["<|end|>"])
            self._attrs[texts["<|end|>"]] = ATTR_USER_DEFINED
        # gemma4 / plamo2 use "</s>" as a normal token.
        if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
            eog.discard(texts["</s>"])
            self._attrs[texts["</s>"]] = ATTR_NORMAL
        return frozenset(eog)

    # -------------------------------------------------------------------------------------- encoding
    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of `text`, identical to llama.cpp's ``llama_tokenize``.

        add_bos: None follows the file (``add_bos_token`` / ``add_eos_token``, llama.cpp's
        ``add_special=True``); True always starts with BOS; False adds neither BOS nor EOS.
        special: match control tokens written in the text (``<|im_start|>``) as single tokens;
        user-defined tokens are always matched, as in llama.cpp.

        Example:
            >>> from rocmforge.registry import resolve
            >>> tok = Tokenizer.from_gguf(resolve("smollm2-135m"))
            >>> tok.encode("<|im_start|>user"), tok.encode("<|im_start|>user", special=False)[:3]
            ([1, 4093], [44, 108, 306])
        """
        ids: list[int] = []
        if add_bos or (add_bos is None and self.add_bos):
            if self.bos_id is None:
                raise UnsupportedError("this model's vocabulary has no BOS token")
            ids.append(self.bos_id)
        prev_is_special = True  # SentencePiece adds its space prefix at the start and after special tokens
        for piece in self._split_special(text, special):
            if isinstance(piece, int):
                ids.append(piece)
                prev_is_special = True
            elif self.model == "gpt2":
                ids.extend(self._bpe.encode(piece, add_special_tokens=False).ids)
            else:
                if self.add_space_prefix and prev_is_special:
                    piece = " " + piece
                self._spm_encode(piece.replace(" ", "\u2581"), ids)
                prev_is_special = False
        if add_bos is not False and self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _split_special(self, text: str, special: bool) -> list[str | int]:
        """llama.cpp's tokenizer_st_partition: for each special token, longest first, cut every text
        fragment at each of its occurrences. Returns text fragments (str) and special ids (int)."""
        if not text or self._special_regex is None:
            return [text] if text else []
        present = {p for longest in set(self._special_regex.findall(text)) for p in self._special_prefixes[longest]}
        fragments: list[str | int] = [text]
        for tid in self._special_ids:
            token = self._texts[tid]
            if token not in present or (not special and self._attrs[tid] & (ATTR_CONTROL | ATTR_UNKNOWN)):
                continue
            split: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or token not in fragment:
                    split.append(fragment)
                    continue
                for k, part in enumerate(fragment.split(token)):
                    if k:
                        split.append(tid)
                    if part:
                        split.append(part)
            fragments = split
        return fragments

    def _spm_encode(self, text: str, out: list[int]) -> None:
        """llm_tokenizer_spm_session::tokenize: start from single characters and keep merging the adjacent
        pair whose concatenation is the highest-scoring token (leftmost on ties)."""
        if not text:
            return
        symbols = list(text)
        n = len(symbols)
        next_ = [*range(1, n), -1]
        prev = list(range(-1, n - 1))
        id_of, scores = self._id_of, self._scores

        def candidate(left: int, right: int):
            merged = symbols[left] + symbols[right]
            tid = id_of(merged)
            return None if tid is None else (-scores[tid], left, right, len(merged))

        queue = [c for i in range(1, n) if (c := candidate(i - 1, i)) is not None]
        heapq.heapify(queue)
        while queue:
            _, left, right, size = heapq.heappop(queue)
            a, b = symbols[left], symbols[right]
            if not a or not b or len(a) + len(b) != size:  # one side changed since this pair was queued
                continue
            symbols[left], symbols[right] = a + b, ""
            after = next_[left] = next_[right]
            if after >= 0:
                prev[after] = left
            for pair in ((prev[left], left), (left, after)):
                if pair[0] >= 0 and pair[1] >= 0 and (c := candidate(*pair)) is not None:
                    heapq.heappush(queue, c)
        i = 0
        while i != -1:
            tid = id_of(symbols[i])
            if tid is not None:
                out.append(tid)
            else:  # no token covers this character: one <0xXX> token per UTF-8 byte
                out.extend(self._byte_token(byte) for byte in symbols[i].encode())
            i = next_[i]

    def _byte_token(self, byte: int) -> int:
        tid = self._id_of(f"<0x{byte:02X}>")
        if tid is None and byte < 0x80:  # llama.cpp falls back to the byte itself as a token
            tid = self._id_of(chr(byte))
        if tid is None:
            raise ModelFileError(f"the vocabulary has no byte token <0x{byte:02X}> to spell an unknown character")
        return tid

    # -------------------------------------------------------------------------------------- decoding
    def _piece(self, token_id: int) -> bytes:
        """A token's bytes as llama.cpp's token_to_piece(special=True) gives them (made when asked: a table of
        every token's bytes would hold Gemma's 262k vocabulary twice)."""
        attr, text = self._attrs[token_id], self._texts[token_id]
        if attr & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN):
            return text.encode()
        if attr & ATTR_NORMAL:
            return text.replace("\u2581", " ").encode() if self.model == "llama" else _byte_level_decode(text)
        if attr & ATTR_BYTE:
            return bytes([int(text[3:5], 16)])
        return b""  # unused / undefined tokens print nothing

    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The bytes one token stands for (may be part of a UTF-8 character). Control tokens give
        their text when `special`, else nothing, as in llama.cpp's ``llama_token_to_piece``."""
        if not special and self._attrs[token_id] & (ATTR_CONTROL | ATTR_UNKNOWN):
            return b""
        return self._piece(token_id)

    def is_special(self, token_id: int) -> bool:
        """A control token (``<|im_end|>``, ``<bos>``), or a user-defined one written like one (``<tool_call>``):
        marked as never spelled by ordinary text, as llama.cpp's grammar sampler treats them."""
        attr, text = self._attrs[token_id], self._texts[token_id]
        return bool(attr & (ATTR_CONTROL | ATTR_UNKNOWN)
                    or attr & ATTR_USER_DEFINED and text.startswith("<") and text.endswith(">"))

    def token_text(self, token_id: int) -> str:
        """A token's text for display (``'<|im_start|>'``, ``' world'``; a lone byte of a longer UTF-8
        character shows as U+FFFD).

        Example:
            >>> from rocmforge.registry import resolve
            >>> Tokenizer.from_gguf(resolve("smollm2-135m")).token_text(905)
            ' world'
        """
        return self._piece(token_id).decode("utf-8", errors="replace")

    def decode(self, ids: Iterable[int], special: bool = True) -> str:
        """Text of `ids`, identical to llama.cpp's ``llama_detokenize(remove_special=False,
        unparse_special=special)``. Invalid UTF-8 (a sequence cut mid-character) shows as U+FFFD.

        Example:
            >>> from rocmforge.registry import resolve
            >>> tok = Tokenizer.from_gguf(resolve("smollm2-135m"))
            >>> tok.decode(tok.encode("<|im_start|>Hi")), tok.decode(tok.encode("<|im_start|>Hi"), special=False)
            ('<|im_start|>Hi', 'Hi')
        """
        pieces = [self.token_bytes(i, special) for i in ids]
        if self.add_space_prefix and pieces and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]  # the space SentencePiece put in front of the first word
        data = b"".join(pieces)
        if self._cleans_spaces:
            data = _clean_up_spaces(data)
        return data.decode("utf-8", errors="replace")

    def incremental_decoder(self, special: bool = True) -> IncrementalDecoder:
        """A decoder for streaming: feed it ids one at a time (see :class:`IncrementalDecoder`)."""
        return IncrementalDecoder(self, special)


class IncrementalDecoder:
    """Turns generated ids into text pieces as they arrive, holding back the bytes of a UTF-8 character
    that is split across tokens until it is complete (so no piece ever contains a broken character).

    Pieces are llama.cpp's per-token ``token_to_piece`` (what llama-server streams); joined they equal
    ``tokenizer.decode(ids)`` for vocabs without llama.cpp's detokenize space clean-up (SmolLM2, Gemma,
    Qwen2), which llama.cpp's streaming does not apply either.

    Example:
        >>> from rocmforge.registry import resolve
        >>> tok = Tokenizer.from_gguf(resolve("smollm2-135m"))
        >>> decoder = tok.incremental_decoder()
        >>> [decoder.feed(i) for i in tok.encode("ok 🦙")] + [decoder.flush()]
        ['ok', ' ', '', '🦙', '']
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = True):
        self._tokenizer, self._special = tokenizer, special
        self._pending = b""
        self._at_start = True

    def feed(self, token_id: int) -> str:
        """Add one token; returns the text that is now complete (possibly '')."""
        piece = self._tokenizer.token_bytes(token_id, self._special)
        if self._at_start and self._tokenizer.add_space_prefix and piece.startswith(b" "):
            piece = piece[1:]
        self._at_start = False
        data = self._pending + piece
        cut = _complete_utf8_length(data)
        self._pending = data[cut:]
        return data[:cut].decode("utf-8", errors="replace")

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character shows as U+FFFD); call when generation ends."""
        rest, self._pending = self._pending, b""
        return rest.decode("utf-8", errors="replace")


def _complete_utf8_length(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # the last lead byte (or ASCII)
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 \
                else 4 if byte >> 3 == 0b11110 else 1
            return len(data) if back >= need else len(data) - back
    return len(data)  # only continuation bytes: invalid anyway, let decode() mark them
