"""The OpenAI endpoints' logic: resolve the model, tokenise, generate through the scheduler, shape the answer.

The scheduler (service.scheduling) is the only way to an engine: `generate(model,
request)` streams GenerationChunks on exactly that model's weights (SPEC §6) and
aborts the request when the stream is closed early.  A completion's prompts run
side by side (service.fanout); what they produce is tallied by
service.tracking and put in wire objects by service.shapers.

A request that uses a sampling feature the serving engine does not implement
(`Engine.features`) is refused with a 400 naming the parameter.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from service.engines.base import SamplingOptions
from service.engines.tokenizer import ChatTokenizer
from service.fanout import Fanout
from service.prompts import PromptInput, check_token_ids, completion_prompts, text_prompt
from service.protocol import APIError, OpenAIBaseModel, unsupported
from service.protocol.chat import ChatCompletionRequest
from service.protocol.completions import CompletionRequest
from service.protocol.models import ModelCard, ModelList
from service.protocol.sampling import SamplingRequest
from service.protocol.tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from service.registry import Registry
from service.shapers import ChatShaper, CompletionShaper, Shaper
from service.tracking import Tracker

SSE_DONE = "data: [DONE]\n\n"
PARAM_OF_FEATURE = {"structured_output": "response_format"}  # SamplingOptions field -> the request's parameter


def sse(event: OpenAIBaseModel) -> str:
    return f"data: {event.model_dump_json(exclude_none=False)}\n\n"


async def refuse_when_full(request: Request) -> None:
    """Route dependency: a full queue is answered 429 before the body is validated, its model resolved or its chat
    rendered.  It runs after the API key check and before the body's validation (FastAPI solves dependencies first)."""
    request.app.state.inference.scheduler.check_room()


class InferenceHandler:
    def __init__(self, scheduler, registry: Registry, base_name: str, default_max_tokens: int, max_model_len: int):
        self.scheduler, self.registry = scheduler, registry
        self.base_name, self.default_max_tokens, self.max_model_len = base_name, default_max_tokens, max_model_len
        self.started = int(time.time())

    @property
    def tokenizer(self) -> ChatTokenizer:
        return self.scheduler.tokenizer

    def models(self) -> ModelList:
        base = ModelCard(id=self.base_name, created=self.started, root=self.base_name, max_model_len=self.max_model_len)
        adapters = [
            ModelCard(
                id=r.name,
                created=r.created_at,
                root=self.base_name,
                parent=self.base_name,
                max_model_len=self.max_model_len,
            )
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
            await self.scheduler.add_model(model, record.fused_tensors, record.per_request_form)
        return model

    async def complete(self, body: CompletionRequest, request: Request):
        request.state.model = model = await self.resolve(body.model)
        prompts = completion_prompts(self.tokenizer, body.prompts, body.add_special_tokens)
        shaper = CompletionShaper(model, self.tokenizer, body)
        options = body.engine_options(self.default_max_tokens)
        return await self._serve(model, body, prompts, options, shaper, count_output=not body.echo_only)

    async def chat(self, body: ChatCompletionRequest, request: Request):
        request.state.model = model = await self.resolve(body.model)
        text = self.tokenizer.apply_chat_template([m.as_template_input() for m in body.messages])
        prompt = text_prompt(self.tokenizer, text, add_special_tokens=False)  # the template writes them
        shaper = ChatShaper(model, self.tokenizer, body)
        return await self._serve(model, body, [prompt], body.engine_options(self.default_max_tokens), shaper)

    async def _serve(
        self,
        model: str,
        body: SamplingRequest,
        prompts: list[PromptInput],
        options: SamplingOptions,
        shaper: Shaper,
        count_output: bool = True,
    ):
        self._check(body, options)
        tracker = Tracker(model, prompts, options.n, arrival=time.perf_counter(), count_output=count_output)
        requests = [prompt.request(f"{shaper.id}-{i}", options) for i, prompt in enumerate(prompts)]
        fanout = Fanout(self.scheduler, model, requests)
        await fanout.start()  # queue-full and engine errors surface here, as a proper status
        if body.stream:
            events = stream_events(fanout, tracker, shaper, body.include_usage_in_stream)
            return StreamingResponse(events, media_type="text/event-stream")
        return await collect(fanout, tracker, shaper)

    def _check(self, body: SamplingRequest, options: SamplingOptions) -> None:
        """400 for a feature the engine lacks, or a token id outside the vocabulary."""
        missing = sorted(options.features() - self.scheduler.features)
        if missing:
            param = PARAM_OF_FEATURE.get(missing[0], missing[0])
            raise unsupported(param, f"the {self.scheduler.engine_name} engine does not implement it (vllm does)")
        for param, token_ids in body.token_ids_named().items():
            check_token_ids(self.tokenizer, param, token_ids)

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        if body.model is not None:
            await self.resolve(body.model)
        if body.messages is not None:
            text = self.tokenizer.apply_chat_template(
                [m.as_template_input() for m in body.messages],
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
            )
            tokens = self.tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))
        else:
            add_special_tokens = True if body.add_special_tokens is None else body.add_special_tokens
            tokens = self.tokenizer.encode(body.prompt or "", add_special_tokens=add_special_tokens)
        return TokenizeResponse(
            count=len(tokens),
            max_model_len=self.max_model_len,
            tokens=tokens,
            token_strs=self.tokenizer.token_strings(tokens) if body.return_token_strs else None,
        )

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        if body.model is not None:
            await self.resolve(body.model)
        check_token_ids(self.tokenizer, "tokens", body.tokens)
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens, skip_special_tokens=False))


async def collect(fanout: Fanout, tracker: Tracker, shaper: Shaper) -> OpenAIBaseModel:
    try:
        async for prompt, chunk in fanout:
            tracker.add(prompt, chunk)
    finally:
        await fanout.aclose()
        tracker.record()
    return shaper.response(tracker)


async def stream_events(fanout: Fanout, tracker: Tracker, shaper: Shaper, include_usage: bool) -> AsyncIterator[str]:
    """SSE events; a client that disconnects cancels this, and closing the fan-out aborts every prompt."""
    try:
        for event in shaper.opening(tracker):
            yield sse(event)
        async for prompt, chunk in fanout:
            tracker.add(prompt, chunk)
            yield sse(shaper.chunk(prompt, chunk, tracker))
        if include_usage:
            yield sse(shaper.usage_chunk(tracker))
    except Exception as err:  # headers are sent: the error becomes the stream's last event
        yield f"data: {json.dumps(APIError(500, f'generation failed: {err}').response_body())}\n\n"
    else:
        yield SSE_DONE
    finally:
        await fanout.aclose()
        tracker.record()
