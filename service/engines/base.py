"""The engine interface: start, load weights, generate, stop.  Engines never see HTTP.

An engine holds ONE set of weights at a time.  `load_weights` replaces named
tensors in place, read from safetensors files (a model's fused tensors, and the
base's original tensors for whatever must go back to the base); only the
scheduler calls it, and only when no request is running on that engine (SPEC §6).
Which tensors travel is decided by `service.engines.weights.SwapPlanner`.

An engine class is named in `service.engines.ENGINE_CLASSES`, built as
`engine_class(name)(settings)` and started with `await engine.start(base_dir)`.

`SamplingOptions` holds what every engine honours (max_tokens, temperature,
top_p, seed, stop, n) and the optional features of `OPTIONAL_FEATURES`; an
engine class lists the ones it implements in `features`, and the HTTP layer
refuses a request that uses any other (400, naming the parameter).  Prompts
arrive as text and, usually, as token ids (the HTTP layer tokenises them).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

if TYPE_CHECKING:
    from service.engines.tokenizer import ChatTokenizer
    from service.settings import Settings


# SamplingOptions fields an engine may or may not implement (Engine.features); the rest every engine honours
OPTIONAL_FEATURES = frozenset(
    {
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "stop_token_ids",
        "ignore_eos",
        "min_tokens",
        "logprobs",
        "prompt_logprobs",
        "structured_output",
    }
)
MAX_LOGPROBS = 20  # most likely tokens reported per position (vLLM's default max_logprobs)


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text: any JSON object, or JSON that matches a schema."""

    kind: Literal["json_object", "json_schema"]
    json_schema: str | None = None  # the schema as JSON text (json_schema only)

    def __post_init__(self):
        if (self.kind == "json_schema") != (self.json_schema is not None):
            raise ValueError("structured_output: a json_schema constraint needs a schema, json_object none")


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    # optional features (OPTIONAL_FEATURES): the defaults change nothing
    top_k: int = 0  # 0: every token
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k: each generated token's logprob and the k most likely tokens
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    structured_output: StructuredOutput | None = None

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n: must be >= 1, got {self.n}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0: every token), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p: must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty: must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens: must be in [0, max_tokens], got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name}: must be in [0, {MAX_LOGPROBS}], got {value}")

    def features(self) -> frozenset[str]:
        """The optional features this request uses: those set away from their defaults."""
        return frozenset(
            field.name
            for field in dataclasses.fields(self)
            if field.name in OPTIONAL_FEATURES and getattr(self, field.name) != field.default
        )


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str  # plain text; a chat request arrives here with the chat template applied
    sampling: SamplingOptions
    prompt_token_ids: tuple[int, ...] | None = None  # the prompt's tokens; when given the engine uses them as is


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probabilities: the token there, and the most likely tokens (raw logits, fp32)."""

    token_id: int
    logprob: float
    rank: int  # 1: the most likely token
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the k most likely, most likely first


@dataclasses.dataclass(frozen=True)
class GenerationChunk:
    index: int  # choice index, 0..n-1
    text: str  # text added since this choice's previous chunk
    new_tokens: int  # tokens generated in this chunk
    prompt_tokens: int
    finish_reason: str | None  # "stop" | "length" | None while running
    token_ids: tuple[int, ...] = ()  # the tokens generated in this chunk (an end-of-sequence token included)
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token of token_ids, when the request asks
    # the request's first chunk carries these (prompt_logprobs when asked: None for the first token)
    prompt_token_ids: tuple[int, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclasses.dataclass(frozen=True)
class TensorFile:
    """Some tensors of one safetensors file, by HF checkpoint name (e.g. model.layers.0.self_attn.q_proj.weight)."""

    path: Path
    names: tuple[str, ...]


class Engine(abc.ABC):
    name: ClassVar[str]
    features: ClassVar[frozenset[str]] = frozenset()  # the OPTIONAL_FEATURES it implements
    tokenizer: ChatTokenizer  # set by start()

    def __init__(self, settings: Settings):
        self.settings = settings

    @abc.abstractmethod
    async def start(self, base_dir: Path) -> None: ...

    @abc.abstractmethod
    async def load_weights(self, files: Sequence[TensorFile]) -> None:
        """Replace the named tensors in place; every tensor not named keeps its value."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream text deltas; each choice's last chunk carries its finish_reason."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def apply_chat_template(self, messages: list[dict]) -> str: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @property
    def alive(self) -> bool:
        """False once the engine can serve no more (e.g. its worker process died); in-process engines live
        as long as the server does."""
        return True
