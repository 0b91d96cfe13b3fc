"""Request bodies of the OpenAI-compatible routes, validated by pydantic (a failure is a 400 in OpenAI's shape).

Unknown fields are accepted and ignored (clients send ``user``, ``stream_options`` and the like); a field we
cannot honour (``best_of`` > 1) is refused by ``SamplingFields.unsupported``. Structured output: OpenAI's
``response_format``, llama.cpp server's ``json_schema`` and ``grammar`` (GBNF, or Lark), and ``tools``.

>>> ChatRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0).sampling()
{'temperature': 0.0}
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "frequency_penalty",
                   "presence_penalty", "seed")


class ContextOption(BaseModel):
    """``"context": {"k": 3}``: answer from the context store's k best passages (cited in the response)."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(3, ge=1, le=50)
    mode: Literal["hybrid", "vector", "keyword"] = "hybrid"


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=0)
    logit_bias: dict[int, float] | None = None
    n: int = Field(1, ge=1)
    context: ContextOption | None = None
    response_format: dict[str, Any] | None = None
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None

    def sampling(self) -> dict[str, Any]:
        """Keyword arguments for ``SamplingParams``: only what the client set (the rest keep llama.cpp defaults)."""
        out = {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}
        if self.logit_bias:
            out["logit_bias"] = dict(self.logit_bias)
        return out

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> str | None:
        """The name of a field set to something this server does not do, or None."""
        extra = self.model_extra or {}
        if (extra.get("best_of") or 1) != 1:
            return "best_of"
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def as_template_message(self) -> dict[str, Any]:
        """What the chat template sees: plain-text content (and an assistant's tool calls, a tool result's call
        id); ``developer`` is OpenAI's new name for ``system``."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    source: str = "<http>"
    metadata: dict[str, Any] = Field(default_factory=dict)
    collection: str = "default"


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokens: list[int]
