"""POST /v1/chat/completions: messages on the base model's chat template, logprobs in OpenAI's chat shape."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from service.engines.base import MAX_LOGPROBS, SamplingOptions
from service.protocol import UNSUPPORTED_VALUE, OpenAIBaseModel, RequestModel, UsageInfo, invalid, now, random_id
from service.protocol.fields import CHAT_FIELDS, MESSAGE_FIELDS
from service.protocol.sampling import SamplingRequest


class TextPart(RequestModel):
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "text":
            why = "content parts of type '{kind}' are not supported (text only)"
            raise PydanticCustomError(UNSUPPORTED_VALUE, why, {"kind": data.get("type")})
        return data


class ChatMessage(RequestModel):
    openai_fields = MESSAGE_FIELDS
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]

    def as_template_input(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatCompletionRequest(SamplingRequest):
    openai_fields = CHAT_FIELDS
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # accepted, and change nothing (service.protocol.fields.NO_EFFECT)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    @model_validator(mode="after")
    def _top_logprobs_with_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise invalid("top_logprobs", "needs logprobs: true")
        if self.max_completion_tokens is not None and self.min_tokens > self.max_completion_tokens:
            raise invalid("min_tokens", f"{self.min_tokens} is more than max_completion_tokens")
        return self

    def engine_options(self, default_max_tokens: int) -> SamplingOptions:
        options = self.sampling_options(default_max_tokens)
        return dataclasses.replace(
            options,
            max_tokens=self.max_completion_tokens or options.max_tokens,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
        )


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobContent(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIBaseModel):
    content: list[TokenLogprobContent] | None = None
    refusal: list[TokenLogprobContent] | None = None


class AssistantMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(OpenAIBaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
