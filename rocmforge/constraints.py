"""Constrained decoding: a grammar (JSON schema, any JSON object, Lark or GBNF, a regex) limits which tokens the
sampler may draw, so the output always parses.

The grammar engine is llguidance (Rust, no dependencies, a 3 MB wheel): it computes the set of allowed tokens
lazily from the tokenizer's byte trie in tens of microseconds per token, handles tokens that straddle grammar
symbols exactly, and takes JSON schemas, Lark grammars (GBNF converted by its own ``gbnf_to_lark``) and regexes.

A ``Constraint`` is one sequence's matcher. Before each sample ``mask()`` gives the allowed tokens as a packed
int32 bitmask (bit ``t % 32`` of word ``t // 32``, the layout llguidance, xgrammar and vLLM share) that
``Sampler.sample(..., mask=...)`` applies before anything else; after it, ``accept(token)`` advances the matcher.
While the grammar accepts its text as complete, the model's end-of-generation tokens are allowed too.

>>> from rocmforge.registry import resolve
>>> from rocmforge.tokenizer import Tokenizer
>>> tokenizer = Tokenizer.from_gguf(resolve("smollm2-135m"))  # doctest: +SKIP
>>> constraint = Constraint(tokenizer, Grammar.json_schema({"type": "boolean"}))  # doctest: +SKIP
>>> sorted(tokenizer.token_text(t) for t in constraint.allowed_ids())[:3]  # doctest: +SKIP
['f', 'fal', 'false']
"""
from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from rocmforge.tokenizer import Tokenizer


class GrammarError(ValueError):
    """The grammar or schema is invalid (the message is llguidance's, on one line)."""


@dataclass(frozen=True)
class Grammar:
    """A grammar in llguidance's serialized form; build it with one of the class methods.

    >>> Grammar.regex("[0-9]+").source
    'regex'
    """

    text: str
    source: str

    @classmethod
    def json_schema(cls, schema: dict | str) -> Grammar:
        """Any JSON value that validates against ``schema`` (a dict or its JSON text)."""
        from llguidance import LLMatcher

        try:
            return cls(LLMatcher.grammar_from_json_schema(schema if isinstance(schema, str) else json.dumps(schema),
                                                          defaults={"whitespace_flexible": False}), "json_schema")
        except ValueError as exc:
            raise GrammarError(f"invalid JSON schema: {exc}") from None

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's ``response_format: {"type": "json_object"}``)."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def lark(cls, text: str) -> Grammar:
        """A Lark grammar (llguidance's dialect) or a llama.cpp GBNF grammar (``root ::= ...``), told apart by syntax."""
        from llguidance import LLMatcher
        from llguidance.gbnf_to_lark import any_to_lark

        try:
            return cls(LLMatcher.grammar_from_lark(any_to_lark(text)), "grammar")
        except Exception as exc:  # the GBNF converter raises its own error types
            raise GrammarError(f"invalid grammar: {_one_line(exc)}") from None

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        from llguidance import LLMatcher

        return cls(LLMatcher.grammar_from_regex(pattern), "regex")


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


_LOCK = threading.Lock()
_TOKENIZERS: weakref.WeakKeyDictionary[Tokenizer, Any] = weakref.WeakKeyDictionary()


def _ll_tokenizer(tokenizer: Tokenizer) -> Any:
    """The llguidance view of ``tokenizer`` (built once per tokenizer: ~0.2 s for a 49k vocabulary)."""
    from llguidance import LLTokenizer, TokenizerWrapper

    with _LOCK:
        cached = _TOKENIZERS.get(tokenizer)
        if cached is None:
            cached = _TOKENIZERS[tokenizer] = LLTokenizer(TokenizerWrapper(_Vocabulary(tokenizer)))
        return cached


class _Vocabulary:
    """What llguidance's ``TokenizerWrapper`` reads: each token's bytes, special tokens marked by a leading 0xFF
    (so no grammar text can spell them, as llguidance's llama.cpp bridge does), and an encoder."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eot_ids)
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]
        special = set(self.special_token_ids)
        self.tokens = [b"\xff" + tokenizer.token_bytes(i) if i in special else tokenizer.token_bytes(i)
                       for i in range(tokenizer.vocab_size)]

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_bos=False, special=False)


class Constraint:
    """One sequence's grammar state: ``mask()`` before a sample, ``accept(token)`` after it.

    Raises ``GrammarError`` when the grammar does not compile (a one-line message).
    """

    def __init__(self, tokenizer: Tokenizer, grammar: Grammar):
        from llguidance import LLMatcher

        self.vocab_size = tokenizer.vocab_size
        self._eot = np.array(sorted(tokenizer.eot_ids), dtype=np.int64)
        self._matcher = LLMatcher(_ll_tokenizer(tokenizer), grammar.text, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(f"invalid {grammar.source}: {_one_line(Exception(self._matcher.get_error()))}")
        self._mask = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)

    @property
    def done(self) -> bool:
        """The grammar allows no further token (the text is complete)."""
        return self._matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        """The text so far is a complete match (it may still go on)."""
        return self._matcher.is_accepting()

    def mask(self) -> np.ndarray:
        """The allowed next tokens as a packed int32 bitmask ``[ceil(vocab / 32)]`` (reused between calls)."""
        mask = self._mask
        self._matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        if self._matcher.is_accepting():  # the text is complete: the model may end here with any of its end tokens
            words = mask.view(np.uint32)
            np.bitwise_or.at(words, self._eot // 32, (np.uint32(1) << (self._eot % 32).astype(np.uint32)))
        return mask

    def allowed_ids(self) -> np.ndarray:
        """The ids ``mask()`` allows (for inspection and tests)."""
        return np.flatnonzero(unpack_mask(self.mask(), self.vocab_size))

    def accept(self, token: int) -> None:
        """Advance past ``token`` (the sampler drew it under ``mask()``; an end token is accepted as the end)."""
        if token in self._eot:
            return
        if not self._matcher.consume_token(int(token)):
            raise GrammarError(f"token {token} is not allowed here: {self._matcher.get_error()}")


_MASK_WORKER = ThreadPoolExecutor(1, "rocmforge-mask")


def masks_during(constraints: Sequence[Constraint | None], work: Callable[[], Any]) -> list[np.ndarray | None]:
    """Run ``work()`` (the forward) while a worker thread computes each constraint's next mask (llguidance
    releases the GIL), so the mask costs no time when the forward takes longer. Returns the masks in order."""
    if not any(c is not None for c in constraints):
        work()
        return [None] * len(constraints)
    future = _MASK_WORKER.submit(lambda: [c.mask() if c is not None else None for c in constraints])
    try:
        work()
    finally:
        masks = future.result()
    return masks


def unpack_mask(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Bitmask words -> one bool per token id.

    >>> unpack_mask(np.array([0b101], dtype=np.int32), 4).tolist()
    [True, False, True, False]
    """
    return np.unpackbits(mask.view(np.uint8), count=vocab_size, bitorder="little").view(bool)


def grammar_from(json_schema: Any = None, grammar: Grammar | str | None = None,
                 response_format: Any = None) -> Grammar | None:
    """The one grammar these options ask for, or None.

    ``json_schema``: a dict, its JSON text, or a pydantic model class. ``grammar``: a ``Grammar`` or Lark/GBNF
    text. ``response_format``: OpenAI's ``{"type": "json_schema", "json_schema": {"schema": ...}}`` or
    ``{"type": "json_object"}`` (llama-cpp-python's ``{"type": "json_object", "schema": ...}`` too), or
    ``{"type": "text"}``.

    >>> grammar_from(response_format={"type": "json_object"}).source
    'json_schema'
    >>> grammar_from(response_format={"type": "xml"})  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    GrammarError: response_format type must be "text", "json_object" or "json_schema", got 'xml'
    """
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if schema is None:
                raise GrammarError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
            json_schema = json_schema if json_schema is not None else schema
        elif kind == "json_object":
            json_schema = json_schema if json_schema is not None else response_format.get("schema") or {"type": "object"}
        elif kind != "text":
            raise GrammarError(f'response_format type must be "text", "json_object" or "json_schema", got {kind!r}')
    if json_schema is not None and grammar is not None:
        raise GrammarError("give a JSON schema or a grammar, not both")
    if json_schema is not None:
        if hasattr(json_schema, "model_json_schema"):
            json_schema = json_schema.model_json_schema()
        return Grammar.json_schema(json_schema)
    if isinstance(grammar, str):
        return Grammar.lark(grammar)
    return grammar
