"""What a completion and a chat request share: the model, sampling as vLLM maps it, streaming, structured output.

Fields are OpenAI's unless marked as vLLM's extensions (named and bounded as in
vLLM's OpenAI server).  `None` always means "not given": the engine default.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from service.engines.base import SamplingOptions, StructuredOutput
from service.protocol import RequestModel, invalid
from service.protocol.fields import STREAM_OPTIONS_FIELDS

MAX_N = 8
MAX_STOP = 4
MAX_LOGIT_BIAS = 100.0

TokenId = Annotated[int, Field(ge=0)]


class StreamOptions(RequestModel):
    openai_fields = STREAM_OPTIONS_FIELDS
    include_usage: bool = False
    include_obfuscation: bool = False  # changes nothing: this server never pads its chunks


class JsonSchemaSpec(RequestModel):
    """OpenAI's `response_format.json_schema`."""

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the grammar holds the output to the schema whether strict or not


class ResponseFormat(RequestModel):
    """`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {...}}`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise invalid("response_format.json_schema", "required with type json_schema, and only with it")
        return self

    def constraint(self) -> StructuredOutput | None:
        if self.type == "json_object":
            return StructuredOutput("json_object")
        if self.type == "json_schema" and self.json_schema is not None:
            return StructuredOutput("json_schema", json.dumps(self.json_schema.schema_))
        return None


class SamplingRequest(RequestModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)  # int64, as vLLM
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None  # an OpenAI field of chat, vLLM's extension of completions
    # vLLM's extensions
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0: every token
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_and_bounded_biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not (token.isascii() and token.isdigit()):
                raise ValueError(f"keys are token ids, got {token!r}")
            if abs(bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"biases lie in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias}")
        return value

    @model_validator(mode="after")
    def _min_tokens_within_max_tokens(self) -> SamplingRequest:
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise invalid("min_tokens", f"{self.min_tokens} is more than max_tokens ({self.max_tokens})")
        return self

    def sampling_options(self, default_max_tokens: int) -> SamplingOptions:
        """The engine's options for what both endpoints share; each endpoint adds its own (`engine_options`)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        bias = tuple(sorted((int(token), float(value)) for token, value in (self.logit_bias or {}).items()))
        return SamplingOptions(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=stop,
            n=self.n,
            top_k=max(0, self.top_k or 0),
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=bias,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            structured_output=None if self.response_format is None else self.response_format.constraint(),
        )

    def token_ids_named(self) -> dict[str, list[int]]:
        """Token ids the request names outside its prompt, by parameter (checked against the vocabulary)."""
        return {
            "logit_bias": [int(token) for token in self.logit_bias or {}],
            "stop_token_ids": list(self.stop_token_ids or ()),
        }

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)
