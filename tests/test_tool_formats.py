"""Tool-call syntaxes beyond Hermes (``rocmforge/tool_formats.py``): the format picked from the chat template, calls
parsed out of answers, the forced-call grammar of each format checked token by token with SmolLM2's tokenizer,
and whole chat completions with SmolLM2 under small Llama 3.1- and Mistral-style templates."""
from __future__ import annotations

import json

import pytest

from rocmforge.constraints import Constraint, GrammarError
from rocmforge.model import load
from rocmforge.tokenizer import Tokenizer
from rocmforge.tool_formats import HERMES, LLAMA3_JSON, MISTRAL, format_for
from rocmforge.tools import OfferedTools, forced_call_grammar, parse_tool_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}

# the parts of the real templates that tell their syntax (Llama 3.1 8B Instruct, Mistral 7B v0.3, Qwen 2.5)
LLAMA31 = ("{%- if tools is not none %}Given the following functions, please respond with a JSON for a function call "
           "with its proper arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function "
           "name, \"parameters\": dictionary of argument name and its value}.\n\n"
           "{%- for t in tools %}{{ t | tojson }}\n\n{%- endfor %}{%- endif %}"
           "{%- for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
           "{{ message['content'] }}<|eot_id|>{%- endfor %}"
           "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}")
MISTRAL_V3 = ("{%- if tools is not none %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}"
              "{%- for message in messages %}{%- if message['role'] == 'user' %}[INST] {{ message['content'] }}[/INST]"
              "{%- elif message.tool_calls is defined %}[TOOL_CALLS] [{%- for c in message.tool_calls %}"
              "{{ c.function | tojson }}{%- endfor %}]{%- else %}{{ message['content'] }}{%- endif %}{%- endfor %}")
QWEN25 = ("{%- if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>"
          "For each function call, return a json object with function name and arguments within <tool_call></tool_call>"
          " XML tags{%- endif %}")


def test_the_format_comes_from_the_template():
    assert format_for(LLAMA31) is LLAMA3_JSON and format_for("<|python_tag|>{{ tools }}") is LLAMA3_JSON
    assert format_for(MISTRAL_V3) is MISTRAL
    assert format_for(QWEN25) is HERMES and format_for(None) is HERMES
    # a template that does not read tools is taught Hermes in the system message, whatever it contains
    assert OfferedTools.of([WEATHER], "[TOOL_CALLS] no tool variable here").format is HERMES
    assert OfferedTools.of([WEATHER], MISTRAL_V3).format is MISTRAL


@pytest.mark.parametrize("fmt, text, expected", [
    (HERMES, 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
     [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    (HERMES, '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>', []),
    (HERMES, "<tool_call>{not json}</tool_call>", []),
    (LLAMA3_JSON, '{"name": "get_weather", "parameters": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})]),
    (LLAMA3_JSON, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
                  '{"name": "get_time", "parameters": {}}', [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    (LLAMA3_JSON, 'The weather: {"name": "get_weather", "parameters": {}}', []),  # text first: an answer, no call
    (LLAMA3_JSON, '{"name": "get_weather", "parameters": "Paris"}', []),
    (MISTRAL, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_time", '
              '"arguments": {}, "id": "abc123def"}]', [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    (MISTRAL, '[TOOL_CALLS]get_weather[ARGS]{"city": "Lima"}', [("get_weather", {"city": "Lima"})]),
    (MISTRAL, 'It is sunny in Rome.', []),
])
def test_calls_are_parsed_in_each_format(fmt, text, expected):
    assert fmt.parse(text, {"get_weather", "get_time"}) == expected


def test_parsed_calls_take_openais_shape():
    offered = OfferedTools.of([WEATHER], LLAMA31)
    (call,) = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Paris"}}', offered)
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


@pytest.fixture(scope="module")
def tokenizer(smollm2_path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path)


def walk(tokenizer: Tokenizer, grammar, ids: list[int]) -> tuple[bool, bool]:
    """(every id allowed in turn, the grammar complete at the end)."""
    constraint = Constraint(tokenizer, grammar)
    for token in ids:
        if token not in constraint.allowed_ids():
            return False, False
        constraint.accept(token)
    return True, constraint.accepting


@pytest.mark.parametrize("fmt, good, bad", [
    (HERMES, '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>',
     '<tool_call>\n{"name":"get_weather","parameters":{"city":"Paris"}}\n</tool_call>'),
    (LLAMA3_JSON, '{"name":"get_weather","parameters":{"city":"Paris"}}',
     '{"name":"get_weather","arguments":{"city":"Paris"}}'),
    (MISTRAL, '[TOOL_CALLS] [{"name":"get_weather","arguments":{"city":"Paris"}}]',
     '[TOOL_CALLS] [{"name":"get_time","arguments":{}}]'),
])
def test_the_forced_grammar_takes_a_call_in_its_format_only(tokenizer, fmt, good, bad):
    offered = OfferedTools((WEATHER, CLOCK), fmt)
    grammar = forced_call_grammar(offered, {"type": "function", "function": {"name": "get_weather"}})
    assert walk(tokenizer, grammar, tokenizer.encode(good, add_bos=False, special=False)) == (True, True)
    assert walk(tokenizer, grammar, tokenizer.encode(bad, add_bos=False, special=False))[0] is False
    assert fmt.parse(good, {"get_weather"}) == [("get_weather", {"city": "Paris"})]


def test_mistrals_marker_is_its_special_token_where_the_vocabulary_has_one(tokenizer):
    """With a special id for [TOOL_CALLS] (a special token of SmolLM2 that does not end a generation stands in)
    the call must start with that one token: the text spelled out is refused."""
    marker = next(i for i in range(1, 64) if tokenizer.is_special(i) and i not in tokenizer.eot_ids)
    grammar = forced_call_grammar(OfferedTools((WEATHER,), MISTRAL), "required", lambda text: marker)
    call = tokenizer.encode(' [{"name":"get_weather","arguments":{"city":"Oslo"}}]', add_bos=False, special=False)
    assert walk(tokenizer, grammar, [marker, *call]) == (True, True)
    assert walk(tokenizer, grammar, tokenizer.encode("[TOOL_CALLS]", add_bos=False, special=False))[0] is False


def test_a_named_function_that_is_not_offered_is_refused():
    with pytest.raises(GrammarError, match="'nope', which is not among the tools"):
        forced_call_grammar(OfferedTools((WEATHER,), LLAMA3_JSON), {"type": "function", "function": {"name": "nope"}})


@pytest.fixture(scope="module")
def model(smollm2_path):
    return load(smollm2_path, device="cpu", n_ctx=512)


@pytest.mark.parametrize("template, fmt", [(LLAMA31, LLAMA3_JSON), (MISTRAL_V3, MISTRAL)])
def test_a_forced_call_comes_back_as_tool_calls_in_the_templates_format(model, monkeypatch, template, fmt):
    monkeypatch.setattr(model.tokenizer, "chat_template", template)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    prompt, grammar, offered = model.chat_prompt(messages, [WEATHER, CLOCK], "required")
    assert offered.format is fmt and "get_weather" in prompt  # the template rendered the tools itself
    answer = model.create_chat_completion(messages, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=60,
                                          temperature=0)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] in ("get_weather", "get_time")
    assert isinstance(json.loads(call["function"]["arguments"]), dict)
    text = model.generate(prompt, max_new_tokens=60, temperature=0, grammar=grammar)
    assert fmt.parse(text, {"get_weather", "get_time"}), text  # the raw answer is written in the format
