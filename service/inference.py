"""The OpenAI endpoints' logic: resolve the model, generate through the scheduler, shape the answer.

The scheduler (service.scheduler) is the only way to an engine: `generate(model,
request)` streams GenerationChunks on exactly that model's weights (SPEC §6) and
aborts the request when the stream is closed early.  Token metrics are recorded
here, where a request's arrival and its every chunk are seen: prompt and
generation tokens, time to first token, time per output token after the first.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import ClassVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from service import metrics
from service.engines.base import GenerationChunk, GenerationRequest
from service.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    OpenAIBaseModel,
    SamplingParams,
    UsageInfo,
    random_id,
)
from service.registry import Registry

SSE_DONE = "data: [DONE]\n\n"


def sse(event: OpenAIBaseModel) -> str:
    return f"data: {event.model_dump_json(exclude_none=False)}\n\n"


@dataclasses.dataclass
class Tracker:
    """What one request has produced so far, per choice, and when."""

    model: str
    n: int
    arrival: float
    texts: list[str] = dataclasses.field(default_factory=list)
    finish: list[str | None] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None

    def __post_init__(self) -> None:
        self.texts, self.finish = [""] * self.n, [None] * self.n

    def add(self, chunk: GenerationChunk) -> None:
        if chunk.new_tokens and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            metrics.TIME_TO_FIRST_TOKEN.labels(model=self.model).observe(self.first_token_at - self.arrival)
        self.texts[chunk.index] += chunk.text
        self.finish[chunk.index] = chunk.finish_reason or self.finish[chunk.index]
        self.prompt_tokens = chunk.prompt_tokens
        self.completion_tokens += chunk.new_tokens

    @property
    def usage(self) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )

    def record(self) -> None:
        """Token counters and time per output token, once, when the request ends."""
        metrics.PROMPT_TOKENS.labels(model=self.model).inc(self.prompt_tokens)
        metrics.GENERATION_TOKENS.labels(model=self.model).inc(self.completion_tokens)
        if self.first_token_at is not None and self.completion_tokens > self.n:
            decode = time.perf_counter() - self.first_token_at
            metrics.TIME_PER_OUTPUT_TOKEN.labels(model=self.model).observe(decode / (self.completion_tokens - self.n))


async def refuse_when_full(request: Request) -> None:
    """Route dependency: a full queue is answered 429 before the body is validated, its model resolved or its chat
    rendered.  It runs after the API key check and before the body's validation (FastAPI solves dependencies first)."""
    request.app.state.inference.scheduler.check_room()


class InferenceHandler:
    def __init__(self, scheduler, registry: Registry, base_name: str, default_max_tokens: int):
        self.scheduler, self.registry = scheduler, registry
        self.base_name, self.default_max_tokens = base_name, default_max_tokens
        self.started = int(time.time())

    def models(self) -> ModelList:
        base = ModelCard(id=self.base_name, created=self.started, root=self.base_name)
        adapters = [
            ModelCard(id=r.name, created=r.created_at, root=self.base_name, parent=self.base_name)
            for r in self.registry.all_serving()
        ]
        return ModelList(data=[base, *adapters])

    async def resolve(self, model: str) -> str:
        """The model's name, once the scheduler serves its current version (a replica may have uploaded it)."""
        if model == self.base_name:
            return model
        record = self.registry.serving(model)
        if record is None:
            raise APIError(
                404,
                f"the model {model!r} does not exist (GET /v1/models lists them)",
                param="model",
                code="model_not_found",
            )
        if not self.scheduler.serves(model, record.fused_tensors):
            await self.scheduler.add_model(model, record.fused_tensors)
        return model

    async def complete(self, body: CompletionRequest, request: Request):
        return await self._serve(body, request, body.prompt_text, CompletionShaper(body.model))

    async def chat(self, body: ChatCompletionRequest, request: Request):
        prompt = self.scheduler.apply_chat_template([m.as_template_input() for m in body.messages])
        return await self._serve(body, request, prompt, ChatShaper(body.model))

    async def _serve(self, body: SamplingParams, request: Request, prompt: str, shaper: Shaper):
        request.state.model = model = await self.resolve(body.model)
        tracker = Tracker(model, body.n, arrival=time.perf_counter())
        generation = GenerationRequest(shaper.id, prompt, body.sampling_options(self.default_max_tokens))
        chunks = self.scheduler.generate(model, generation)
        try:
            first = await anext(chunks)  # queue-full and engine errors surface here, as a proper status
        except BaseException:
            await chunks.aclose()
            raise
        if body.stream:
            events = stream_events(chunks, first, tracker, shaper, body.include_usage_in_stream)
            return StreamingResponse(events, media_type="text/event-stream")
        return await collect(chunks, first, tracker, shaper)


async def collect(
    chunks: AsyncGenerator[GenerationChunk, None], first: GenerationChunk, tracker: Tracker, shaper: Shaper
) -> OpenAIBaseModel:
    try:
        tracker.add(first)
        async for chunk in chunks:
            tracker.add(chunk)
    finally:
        await chunks.aclose()
        tracker.record()
    return shaper.response(tracker)


async def stream_events(
    chunks: AsyncGenerator[GenerationChunk, None],
    first: GenerationChunk,
    tracker: Tracker,
    shaper: Shaper,
    include_usage: bool,
) -> AsyncIterator[str]:
    """SSE events; a client that disconnects cancels this, and closing `chunks` aborts the request."""
    try:
        for event in shaper.opening(tracker.n):
            yield sse(event)
        tracker.add(first)
        yield sse(shaper.chunk(first))
        async for chunk in chunks:
            tracker.add(chunk)
            yield sse(shaper.chunk(chunk))
        if include_usage:
            yield sse(shaper.usage_chunk(tracker))
    except Exception as err:  # headers are sent: the error becomes the stream's last event
        yield f"data: {json.dumps(APIError(500, f'generation failed: {err}').response_body())}\n\n"
    else:
        yield SSE_DONE
    finally:
        await chunks.aclose()
        tracker.record()


class Shaper(abc.ABC):
    """Turns chunks and the final tally into one endpoint's wire objects."""

    id_prefix: ClassVar[str]

    def __init__(self, model: str):
        self.model = model
        self.id = random_id(self.id_prefix)

    def opening(self, n: int) -> Sequence[OpenAIBaseModel]:
        """Events sent before the first chunk (a chat stream announces the assistant role)."""
        return []

    @abc.abstractmethod
    def chunk(self, chunk: GenerationChunk) -> OpenAIBaseModel: ...

    @abc.abstractmethod
    def usage_chunk(self, tracker: Tracker) -> OpenAIBaseModel: ...

    @abc.abstractmethod
    def response(self, tracker: Tracker) -> OpenAIBaseModel: ...


class CompletionShaper(Shaper):
    id_prefix = "cmpl"

    def chunk(self, chunk: GenerationChunk) -> CompletionResponse:
        choice = CompletionChoice(index=chunk.index, text=chunk.text, finish_reason=chunk.finish_reason)
        return CompletionResponse(id=self.id, model=self.model, choices=[choice])

    def usage_chunk(self, tracker: Tracker) -> CompletionResponse:
        return CompletionResponse(id=self.id, model=self.model, choices=[], usage=tracker.usage)

    def response(self, tracker: Tracker) -> CompletionResponse:
        choices = [
            CompletionChoice(index=i, text=text, finish_reason=tracker.finish[i])
            for i, text in enumerate(tracker.texts)
        ]
        return CompletionResponse(id=self.id, model=self.model, choices=choices, usage=tracker.usage)


class ChatShaper(Shaper):
    id_prefix = "chatcmpl"

    def opening(self, n: int) -> list[ChatCompletionChunk]:
        return [
            self._event(ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))) for i in range(n)
        ]

    def chunk(self, chunk: GenerationChunk) -> ChatCompletionChunk:
        delta = DeltaMessage(content=chunk.text)
        return self._event(ChatChunkChoice(index=chunk.index, delta=delta, finish_reason=chunk.finish_reason))

    def usage_chunk(self, tracker: Tracker) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, model=self.model, choices=[], usage=tracker.usage)

    def response(self, tracker: Tracker) -> ChatCompletionResponse:
        choices = [
            ChatChoice(index=i, message=AssistantMessage(content=text), finish_reason=tracker.finish[i])
            for i, text in enumerate(tracker.texts)
        ]
        return ChatCompletionResponse(id=self.id, model=self.model, choices=choices, usage=tracker.usage)

    def _event(self, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, model=self.model, choices=[choice])
