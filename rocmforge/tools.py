"""Tool calls (OpenAI's ``tools`` / ``tool_choice``) on top of a model's chat template.

A template that knows tools (it reads the ``tools`` variable) renders them its own way, and the model answers in
the template's own call syntax (``rocmforge.tool_formats``: Hermes/Qwen ``<tool_call>``, Llama 3.1's JSON,
Mistral's ``[TOOL_CALLS]``). For one that does not (SmolLM2's, Gemma 3's) the tools go into the system message in
the Hermes convention many small models were tuned on: JSON signatures inside ``<tools></tools>``, a call
answered as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, a result sent back inside
``<tool_response></tool_response>``.

``tool_choice``: ``"none"`` leaves the tools out; ``"auto"`` (the default) lets the model answer in text or
call; ``"required"`` or ``{"type": "function", "function": {"name": ...}}`` forces a call through a grammar in
the template's syntax (the call's JSON must match the function's ``parameters`` schema), so even a small model
calls correctly.

>>> offered = OfferedTools.of([{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}])
>>> parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', offered)[0]["function"]
{'name': 'add', 'arguments': '{"a": 1}'}
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rocmforge.constraints import Grammar, GrammarError
from rocmforge.tool_formats import HERMES, ToolFormat, format_for

SYSTEM = ("You are a function calling AI model. You may call one or more functions to assist with the user query. "
          "Here are the available tools: <tools>{tools}</tools> For each function call return a JSON object with "
          "the function name and arguments within <tool_call></tool_call> tags:\n<tool_call>\n"
          '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def _functions(tools: Sequence[Mapping[str, Any]]) -> list[dict]:
    out = []
    for tool in tools:
        function = tool.get("function") if tool.get("type", "function") == "function" else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise GrammarError("each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., ...}}")
        out.append(dict(function))
    return out


@dataclass(frozen=True)
class OfferedTools:
    """The tools a chat request offers (OpenAI's ``tools`` list, checked) and the syntax the model calls them in."""

    tools: tuple[dict, ...]
    format: ToolFormat = HERMES

    @classmethod
    def of(cls, tools: Sequence[Mapping[str, Any]], template: str | None = None) -> OfferedTools:
        """``tools`` for a model with chat ``template``: its own call syntax when it knows tools, else Hermes."""
        _functions(tools)
        return cls(tuple(dict(t) for t in tools), format_for(template) if template_knows_tools(template) else HERMES)

    @property
    def functions(self) -> list[dict]:
        return _functions(self.tools)


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def tool_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]],
                  template_has_tools: bool) -> list[dict]:
    """``messages`` as a template without tool support can render them: the tools described in the system
    message, earlier calls written back as ``<tool_call>`` text, tool results as ``<tool_response>`` user turns."""
    out: list[dict] = []
    for message in messages:
        message = dict(message)
        calls = message.pop("tool_calls", None) or []
        if not template_has_tools and calls:
            text = "\n".join(f"<tool_call>\n{json.dumps(_call_json(c), ensure_ascii=False)}\n</tool_call>"
                             for c in calls)
            message["content"] = ((message.get("content") or "") + "\n" + text).strip()
        elif calls:
            message["tool_calls"] = calls
        if not template_has_tools and message["role"] == "tool":
            message = {"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
        message.setdefault("content", "")
        message["content"] = message["content"] or ""
        out.append(message)
    if tools and not template_has_tools:
        signatures = json.dumps(_functions(tools), ensure_ascii=False)
        system = SYSTEM.format(tools=signatures)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _call_json(call: Mapping[str, Any]) -> dict:
    function = call.get("function", {})
    arguments = function.get("arguments", "{}")
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        pass
    return {"name": function.get("name"), "arguments": arguments}


def forced_call_grammar(offered: OfferedTools, tool_choice: Any,
                        special_id: Callable[[str], int | None] = lambda text: None) -> Grammar | None:
    """The grammar that forces a call for ``tool_choice`` "required" or a named function, in the offered tools'
    syntax; None otherwise. ``special_id(text)``: the id of a special token (``[TOOL_CALLS]``), None if absent."""
    functions = offered.functions
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        chosen = functions
    elif isinstance(tool_choice, Mapping) and isinstance(tool_choice.get("function"), Mapping):
        name = tool_choice["function"].get("name")
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            raise GrammarError(f"tool_choice names {name!r}, which is not among the tools")
    else:
        raise GrammarError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                           '"function": {"name": ...}}')
    return Grammar.lark(offered.format.forced_grammar(chosen, special_id))


def parse_tool_calls(text: str, offered: OfferedTools) -> list[dict]:
    """The calls in ``text`` (in the offered tools' syntax) naming one of them, in OpenAI's ``tool_calls`` shape."""
    names = {f["name"] for f in offered.functions}
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
            for name, arguments in offered.format.parse(text, names)]


def assistant_message(text: str, finish_reason: str | None,
                      offered: OfferedTools | None) -> tuple[dict, str | None]:
    """(the assistant message for ``text``, its finish_reason): with tools offered and called, the calls parsed
    out as ``tool_calls`` (content None) and finish_reason "tool_calls"."""
    calls = parse_tool_calls(text, offered) if offered else []
    if calls:
        return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": text}, finish_reason
