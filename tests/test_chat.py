"""rocmforge.chat: chat templates rendered as llama.cpp renders them (fixtures from
tests/fixtures/make_tokenizer_fixtures.py), inside a jinja2 sandbox."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from rocmforge.chat import GEMMA_TEMPLATE, apply_chat_template, chat_template_for, render_chat
from rocmforge.errors import UnsupportedError
from rocmforge.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
SMOLLM2 = json.loads((FIXTURES / "tokenizer_smollm2.json").read_text())["chat"]
GEMMA3 = json.loads((FIXTURES / "tokenizer_gemma3.json").read_text())["chat"]
USER_ONLY = [{"role": "user", "content": "Hi"}]


def test_smollm2_template_renders_like_llama_cpp_chatml():
    # llama.cpp recognises SmolLM2's template as ChatML and renders it with its built-in code.
    assert render_chat(SMOLLM2["template"], SMOLLM2["messages"]) == SMOLLM2["rendered"]


def test_smollm2_template_adds_its_default_system_prompt():
    rendered = render_chat(SMOLLM2["template"], USER_ONLY)
    assert rendered == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_generation_prompt_is_optional():
    without = render_chat(SMOLLM2["template"], SMOLLM2["messages"], add_generation_prompt=False)
    assert without + "<|im_start|>assistant\n" == SMOLLM2["rendered"]


def test_gemma_builtin_template_matches_llama_cpp():
    assert GEMMA3["template"] == "gemma"  # llama.cpp's built-in, chosen by name
    assert render_chat(chat_template_for(None, "gemma3"), GEMMA3["messages"]) == GEMMA3["rendered"]


def test_file_template_wins_over_builtin():
    assert chat_template_for(SMOLLM2["template"], "gemma3") == SMOLLM2["template"]
    assert chat_template_for(None, "gemma3") == GEMMA_TEMPLATE


def test_model_without_template_is_refused():
    with pytest.raises(UnsupportedError, match="no chat template"):
        chat_template_for(None, "llama")
    with pytest.raises(UnsupportedError, match="no chat template"):
        chat_template_for("", "qwen2")


def test_sandbox_hides_python_internals():
    assert render_chat("{{ ''.__class__ }}", USER_ONLY) == ""  # unsafe attributes read as undefined
    with pytest.raises(UnsupportedError, match="sandbox"):
        render_chat("{{ ''.__class__.__mro__ }}", USER_ONLY)
    with pytest.raises(UnsupportedError, match="sandbox"):
        render_chat("{{ messages.append({'role': 'x'}) }}", USER_ONLY)  # the environment is immutable


def test_template_helpers():
    with pytest.raises(UnsupportedError, match="roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", USER_ONLY)
    assert render_chat("{{ strftime_now('%Y') }}", USER_ONLY) == datetime.now().strftime("%Y")
    assert render_chat("{{ {'text': 'é<b>'} | tojson }}", USER_ONLY) == '{"text": "é<b>"}'
    assert render_chat("{{ bos_token }}{{ tools | length }}", USER_ONLY, bos_token="<s>", tools=[1, 2]) == "<s>2"
    with pytest.raises(UnsupportedError, match="does not parse"):
        render_chat("{% for %}", USER_ONLY)


@pytest.fixture(scope="module")
def gemma3(gemma3_path) -> Tokenizer:
    return Tokenizer.from_gguf(gemma3_path)


def test_apply_chat_template_uses_the_files_template_or_the_builtin(smollm2_path, gemma3):
    smollm2 = Tokenizer.from_gguf(smollm2_path)
    assert apply_chat_template(smollm2, SMOLLM2["messages"]) == SMOLLM2["rendered"]
    assert gemma3.chat_template is None
    prompt = apply_chat_template(gemma3, GEMMA3["messages"])
    assert prompt == GEMMA3["rendered"]
    ids = gemma3.encode(prompt)
    assert ids[:2] == [gemma3.bos_id, gemma3.encode("<start_of_turn>", add_bos=False)[0]]


def test_apply_chat_template_drops_a_bos_that_encoding_adds(gemma3):
    # Like llama.cpp: a template writing {{ bos_token }} must not give the prompt two BOS tokens.
    template = "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"
    prompt = apply_chat_template(gemma3, USER_ONLY, template=template)
    assert prompt == "Hi<eos>"
    assert gemma3.encode(prompt) == [gemma3.bos_id, *gemma3.encode("Hi", add_bos=False), gemma3.eos_id]
