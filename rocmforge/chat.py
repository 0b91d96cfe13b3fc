"""Chat prompts: a model's jinja2 chat template rendered in a sandbox (templates come from files people download).

The environment matches what Hugging Face transformers and llama-cpp-python give templates:
``trim_blocks``/``lstrip_blocks``, the loop-controls extension, ``raise_exception(msg)``,
``strftime_now(fmt)`` and a ``tojson`` filter that keeps non-ASCII text as is.

A GGUF without ``tokenizer.chat_template`` gets a built-in template only where the format is known
for its architecture: Gemma models get llama.cpp's built-in ``gemma`` format (its
``llm_chat_apply_template``), reproduced as a jinja template. (llama-server would fall back to
ChatML for any model without a template; ChatML's ``<|im_start|>`` is not a Gemma token, so that would
prompt Gemma with text it was never trained on.) Any other model without a template raises
:class:`UnsupportedError` when chat is asked for.

Example:
    >>> render_chat(GEMMA_TEMPLATE, [{"role": "user", "content": "Hi"}])
    '<start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n'
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from rocmforge.errors import UnsupportedError

if TYPE_CHECKING:
    import jinja2

    from rocmforge.tokenizer import Tokenizer

# jinja2 is imported by the functions that render (~2 MiB a process that only completes text never needs)

# llama.cpp's LLM_CHAT_TEMPLATE_GEMMA: system messages are trimmed and glued onto the next user turn,
# "assistant" is called "model", every message is trimmed (C isspace) and closed with <end_of_turn>.
GEMMA_TEMPLATE = (
    "{%- set ws = ' \\t\\n\\v\\f\\r' -%}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + message['content'] | trim(ws) -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' -}}"
    "{%- if ns.system and role != 'model' -%}"
    "{{- ns.system + '\\n\\n' -}}"
    "{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{{- message['content'] | trim(ws) + '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

# Built-in templates by general.architecture, for files that carry none.
BUILTIN_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}


def chat_template_for(chat_template: str | None, architecture: str) -> str:
    """The template to use for a model: its own, else the built-in one for its architecture.

    Raises UnsupportedError when the file has no template and none is built in.

    Example:
        >>> chat_template_for(None, "gemma3") == GEMMA_TEMPLATE
        True
    """
    if chat_template:
        return chat_template
    if architecture in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[architecture]
    raise UnsupportedError(f"this {architecture} model has no chat template (tokenizer.chat_template); "
                           f"use plain completion, or pass a template")


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    import jinja2.ext
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise UnsupportedError(f"the chat template does not parse: {exc}") from None


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **variables: Any) -> str:
    """Render `messages` (dicts with "role" and "content") with a jinja2 chat template, sandboxed.

    `variables` are passed through to the template (``tools=[...]``, ``enable_thinking=False``, ...).
    A template that calls ``raise_exception`` (roles out of order, say) or tries something the sandbox
    forbids (``''.__class__.__mro__``, mutating a list) raises UnsupportedError with its message.

    Example:
        >>> render_chat("{% for m in messages %}{{ m.role }}: {{ m.content }}\\n{% endfor %}",
        ...             [{"role": "user", "content": "Hi"}])
        'user: Hi\\n'
    """
    from jinja2.exceptions import SecurityError, TemplateError

    compiled = _compile(template)
    try:
        return compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **variables)
    except SecurityError as exc:
        raise UnsupportedError(f"the chat template tried an operation the sandbox forbids: {exc}") from None
    except TemplateError as exc:
        raise UnsupportedError(f"the chat template refused these messages: {exc}") from None


def apply_chat_template(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]],
                        add_generation_prompt: bool = True, template: str | None = None, **variables: Any) -> str:
    """The prompt text for a chat with this tokenizer's model, ready for ``tokenizer.encode(prompt)``.

    Uses `template`, else the file's ``tokenizer.chat_template``, else the built-in one for the
    architecture. As llama.cpp does (common/chat.cpp), ``bos_token``/``eos_token`` are the BOS/EOS texts,
    and a leading BOS (trailing EOS) the template wrote is dropped when encoding adds it anyway, so the
    prompt never starts with two BOS tokens.

    Example:
        >>> from rocmforge.registry import resolve
        >>> from rocmforge.tokenizer import Tokenizer
        >>> tok = Tokenizer.from_gguf(resolve("gemma3-270m"))
        >>> prompt = apply_chat_template(tok, [{"role": "user", "content": "Hi"}])
        >>> prompt
        '<start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n'
        >>> tok.encode(prompt)
        [2, 105, 2364, 107, 10979, 106, 107, 105, 4368, 107]
    """
    template = template or chat_template_for(tokenizer.chat_template, tokenizer.architecture)
    bos = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos = tokenizer.token_text(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    prompt = render_chat(template, messages, add_generation_prompt, bos_token=bos, eos_token=eos, **variables)
    if tokenizer.add_bos and bos and prompt.startswith(bos):
        prompt = prompt[len(bos):]
    if tokenizer.add_eos and eos and prompt.endswith(eos):
        prompt = prompt[:-len(eos)]
    return prompt
