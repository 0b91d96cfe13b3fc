"""Request bodies of the OpenAI-compatible routes, validated by pydantic (a failure is a 400 in OpenAI's shape).

Unknown fields are accepted and ignored (clients send ``user``, ``stream_options`` and the like); fields we
cannot honour (``n`` > 1, ``echo``, ``logprobs``) are refused by ``SamplingFields.unsupported``.

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
    n: int = 1
    context: ContextOption | None = None

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
        if self.n != 1:
            return "n"
        if extra.get("echo"):
            return "echo"
        if extra.get("logprobs") or extra.get("top_logprobs"):
            return "logprobs"
        if (extra.get("best_of") or 1) != 1:
            return "best_of"
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def as_template_message(self) -> dict[str, str]:
        """What the chat template sees: plain-text content; ``developer`` is OpenAI's new name for ``system``."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


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
