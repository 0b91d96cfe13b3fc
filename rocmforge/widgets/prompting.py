"""The prompt the panel sends: plain completion or the model's chat template, with retrieved passages or not.

The same text ``Model.generate(..., context=store)`` and ``create_chat_completion`` build: passages go in
through ``context_store.prompt.build_context_prompt`` (numbered ``[1]``, ``[2]``, ... with the model asked to
cite them that way); ``cited_passages`` reads those markers back out of the answer.

>>> cited_passages("They purr [1], and sleep [3].", n_passages=2)
[0]
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from context_store.prompt import build_context_prompt

_CITATION = re.compile(r"\[(\d+)\]")


def prompt_text(model: Any, prompt: str, chat: bool, passages: Sequence[Any] = ()) -> str:
    """The full text the model sees (chat: one user message rendered with the model's own template)."""
    if passages:
        prompt, _ = build_context_prompt(prompt, passages)
    if not chat:
        return prompt
    return model.apply_chat_template([{"role": "user", "content": prompt}])


def prompt_ids(model: Any, text: str) -> list[int]:
    """Token ids of ``prompt_text``; the file's BOS rule applies to completions and rendered chats alike."""
    return model.tokenize(text)


def cited_passages(answer: str, n_passages: int) -> list[int]:
    """Indexes (0-based) of the passages the answer cites as ``[n]``, in passage order."""
    numbers = {int(m) for m in _CITATION.findall(answer)}
    return [i for i in range(n_passages) if i + 1 in numbers]
