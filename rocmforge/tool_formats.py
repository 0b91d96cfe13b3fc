"""The syntaxes models call tools in, picked from the chat template: how a call is written (to parse it out of the
answer), and the grammar that forces one (``tool_choice`` "required" or a named function).

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes, Qwen 2/2.5/3, and what a
  template without tools is taught in its system message: ``rocmforge.tools``).
- ``llama3_json``: Llama 3.1/3.2's JSON call, the whole answer ``{"name": ..., "parameters": {...}}`` (after an
  optional ``<|python_tag|>``; several joined by ``;``).
- ``mistral``: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` (also the newer
  ``[TOOL_CALLS]name[ARGS]{...}``); ``[TOOL_CALLS]`` is one special token where the vocabulary has it.

>>> format_for('{{ "[AVAILABLE_TOOLS]" }} ... [TOOL_CALLS]').name, format_for(None).name
('mistral', 'hermes')
>>> LLAMA3_JSON.parse('<|python_tag|>{"name": "add", "parameters": {"a": 1}}', {"add"})
[('add', {'a': 1})]
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Call = tuple[str, dict]  # a function's name and its arguments
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ToolFormat:
    """One tool-call syntax: ``parse(text, names)`` finds the calls of the functions ``names`` in an answer;
    ``forced_grammar(functions, special_id)`` is the Lark grammar of exactly one call to one of ``functions``
    (``special_id(text)`` gives a special token's id, or None when the vocabulary has no such token)."""

    name: str
    args_key: str                                            # "arguments" or "parameters"
    parse_calls: Callable[[str], list[dict]]                 # text -> the call objects written in it
    grammar: Callable[[str, Callable[[str], int | None]], str]  # (one call's %json rule, special_id) -> Lark

    def parse(self, text: str, names: Collection[str]) -> list[Call]:
        calls = []
        for call in self.parse_calls(text):
            arguments = call.get(self.args_key, call.get("arguments", call.get("parameters", {})))
            if call.get("name") in names and isinstance(arguments, dict):
                calls.append((call["name"], arguments))
        return calls

    def forced_grammar(self, functions: Sequence[Mapping[str, Any]],
                       special_id: Callable[[str], int | None]) -> str:
        schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]}, self.args_key: _strict(f)},
                             "required": ["name", self.args_key], "additionalProperties": False} for f in functions],
                  "x-guidance": {"whitespace_flexible": False}}
        return self.grammar(f"%json {json.dumps(schema)}", special_id)


def _strict(function: Mapping[str, Any]) -> dict:
    """The function's parameters schema; an object schema that does not say otherwise takes no other keys
    (as OpenAI's strict mode), so a forced call cannot wander into invented arguments."""
    parameters = dict(function.get("parameters") or {"type": "object"})
    if "properties" in parameters and "additionalProperties" not in parameters:
        parameters["additionalProperties"] = False
    return parameters


def _json_values(text: str, separators: str = "") -> list[Any]:
    """The JSON values written one after another from the start of ``text`` (whitespace and ``separators``
    between them); stops at the first thing that is not one."""
    values, i = [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] in separators):
            i += 1
        if i >= len(text):
            return values
        try:
            value, i = _DECODER.raw_decode(text, i)
        except json.JSONDecodeError:
            return values
        values.append(value)


def _objects(values: list[Any]) -> list[dict]:
    return [v for v in values if isinstance(v, dict)]


# --- Hermes / Qwen ---------------------------------------------------------------------------------------------
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def _hermes_calls(text: str) -> list[dict]:
    return _objects([v for block in _HERMES_BLOCK.findall(text) for v in _json_values(block)[:1]])


HERMES = ToolFormat("hermes", "arguments", _hermes_calls,
                    lambda call, special_id: f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: {call}\n')


# --- Llama 3.1 / 3.2 JSON --------------------------------------------------------------------------------------
def _llama3_calls(text: str) -> list[dict]:
    text = text.strip()
    text = text.removeprefix("<|python_tag|>").lstrip()
    return _objects(_json_values(text, ";")) if text.startswith("{") else []


LLAMA3_JSON = ToolFormat("llama3_json", "parameters", _llama3_calls, lambda call, special_id: f"start: {call}\n")


# --- Mistral ---------------------------------------------------------------------------------------------------
_MISTRAL_NAMED = re.compile(r"\s*([\w.-]+)\[ARGS\]")


def _mistral_calls(text: str) -> list[dict]:
    calls = []
    for part in text.split("[TOOL_CALLS]")[1:]:
        named = _MISTRAL_NAMED.match(part)
        if named:  # [TOOL_CALLS]name[ARGS]{...}
            arguments = _json_values(part[named.end():])[:1]
            calls += [{"name": named[1], "arguments": a} for a in arguments]
            continue
        for value in _json_values(part)[:1]:
            calls += _objects(value if isinstance(value, list) else [value])
    return calls


def _mistral_grammar(call: str, special_id: Callable[[str], int | None]) -> str:
    token = special_id("[TOOL_CALLS]")
    marker = f"<[{token}]>" if token is not None else '"[TOOL_CALLS]"'
    return f'start: {marker} " [" call "]"\ncall: {call}\n'


MISTRAL = ToolFormat("mistral", "arguments", _mistral_calls, _mistral_grammar)

FORMATS = (HERMES, LLAMA3_JSON, MISTRAL)


def format_for(template: str | None) -> ToolFormat:
    """The tool-call syntax a chat template writes calls in (Hermes when it shows none of its own)."""
    text = template or ""
    if "[TOOL_CALLS]" in text:
        return MISTRAL
    if "<|python_tag|>" in text or '"parameters": dictionary of argument name' in text:
        return LLAMA3_JSON
    return HERMES
