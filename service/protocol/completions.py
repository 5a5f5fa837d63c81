"""POST /v1/completions: the request (prompts as text or token ids, logprobs, echo, best_of) and its answers."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from service.engines.base import MAX_LOGPROBS, SamplingOptions
from service.protocol import OpenAIBaseModel, UsageInfo, invalid, now, random_id
from service.protocol.fields import COMPLETION_FIELDS
from service.protocol.sampling import MAX_N, SamplingRequest, TokenId

MAX_PROMPTS = 64  # prompts in one request (each is its own engine request)

TokenPrompt = Annotated[list[TokenId], Field(min_length=1)]
TextPrompts = Annotated[list[str], Field(min_length=1)]
Prompt = str | TextPrompts | TokenPrompt | Annotated[list[TokenPrompt], Field(min_length=1)]


class CompletionRequest(SamplingRequest):
    openai_fields = COMPLETION_FIELDS
    prompt: Prompt
    echo: bool = False
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only with echo: score the prompt, generate nothing
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    # vLLM's extensions
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_special_tokens: bool = True

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Prompt) -> Prompt:
        prompts = cls.as_list(value)
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(prompts)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise invalid("max_tokens", "0 is allowed only with echo: true (the prompt alone, with its logprobs)")
        if self.best_of is not None and self.best_of < self.n:
            raise invalid("best_of", f"must be at least n ({self.n}), got {self.best_of}")
        if self.stream and self.choices_generated > self.n:
            raise invalid("best_of", "best_of > n cannot be streamed (the best are known only at the end)")
        if self.stream and self.prompt_logprobs is not None:
            raise invalid("prompt_logprobs", "not available when streaming (echo with logprobs streams them)")
        return self

    @staticmethod
    def as_list(prompt: Prompt) -> list[str] | list[list[int]]:
        """The prompts one by one: each a string or a list of token ids."""
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [prompt]  # one prompt of token ids
        return prompt  # type: ignore[return-value]  # a list of strings or of token-id lists

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        return self.as_list(self.prompt)

    @property
    def echo_only(self) -> bool:
        """max_tokens 0 with echo: the engine generates one token, which is not returned."""
        return self.max_tokens == 0

    @property
    def choices_generated(self) -> int:
        """Choices the engine generates per prompt: best_of, of which the n best are returned."""
        return self.best_of or self.n

    def engine_options(self, default_max_tokens: int) -> SamplingOptions:
        options = self.sampling_options(default_max_tokens)
        ranked = self.choices_generated > self.n  # ranking by mean logprob needs the sampled tokens' logprobs
        logprobs = self.logprobs if self.logprobs is not None else (0 if ranked else None)
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return dataclasses.replace(
            options,
            n=self.choices_generated,
            max_tokens=1 if self.echo_only else options.max_tokens,
            logprobs=logprobs,
            prompt_logprobs=max(wanted) if wanted else None,
        )


class CompletionLogProbs(OpenAIBaseModel):
    """OpenAI's legacy logprobs: per token its text, logprob, the most likely alternatives and its text offset.

    `text_offset` counts characters of the choice's text (with echo, the prompt's first character is 0)."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(OpenAIBaseModel):
    """vLLM's `prompt_logprobs` entry, keyed by token id."""

    logprob: float
    rank: int
    decoded_token: str


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None  # vLLM's extension


class CompletionStreamChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None


class CompletionChunk(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
