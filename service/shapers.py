"""Chunks and the final tally in one endpoint's wire objects: completions (echo, legacy logprobs, several
prompts) and chat (OpenAI's chat logprobs).

Choices are numbered prompt-major, as OpenAI and vLLM number them: prompt p's
k-th choice is `p * n + k`.  With best_of, the n best of the best_of choices
generated per prompt are returned, best first.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar

from service.engines.base import GenerationChunk, TokenLogprob
from service.engines.tokenizer import ChatTokenizer
from service.logprobs import chat_logprobs, completion_logprobs, prompt_logprobs_extension
from service.protocol import OpenAIBaseModel, random_id
from service.protocol.chat import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
)
from service.protocol.completions import (
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
)
from service.tracking import Tracker


class Shaper(abc.ABC):
    id_prefix: ClassVar[str]

    def __init__(self, model: str, tokenizer: ChatTokenizer, n: int):
        self.model, self.tokenizer, self.n = model, tokenizer, n
        self.id = random_id(self.id_prefix)

    def opening(self, tracker: Tracker) -> Sequence[OpenAIBaseModel]:
        """Events sent before the first chunk (a chat stream announces the assistant role)."""
        return []

    @abc.abstractmethod
    def chunk(self, prompt: int, chunk: GenerationChunk, tracker: Tracker) -> OpenAIBaseModel: ...

    @abc.abstractmethod
    def usage_chunk(self, tracker: Tracker) -> OpenAIBaseModel: ...

    @abc.abstractmethod
    def response(self, tracker: Tracker) -> OpenAIBaseModel: ...


class CompletionShaper(Shaper):
    id_prefix = "cmpl"

    def __init__(self, model: str, tokenizer: ChatTokenizer, body: CompletionRequest):
        super().__init__(model, tokenizer, body.n)
        self.echo, self.echo_only, self.top_k = body.echo, body.echo_only, body.logprobs
        self.prompt_top_k = body.prompt_logprobs
        self.next_offset: dict[int, int] = {}  # streamed choice -> text offset of its next token

    def _run(
        self, tracker: Tracker, prompt: int, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob], echo: bool
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """The tokens a choice reports: the prompt's first when echoed, then the generated ones (none if echo_only)."""
        tokens: list[int] = [] if self.echo_only else list(token_ids)
        values: list[TokenLogprob | None] = [] if self.echo_only else list(logprobs)
        if echo:
            prompt_values = tracker.prompt_logprobs[prompt] or (None,) * len(tracker.prompts[prompt].token_ids)
            tokens, values = [*tracker.prompts[prompt].token_ids, *tokens], [*prompt_values, *values]
        return tokens, values

    def _choice(self, tracker: Tracker, prompt: int, index: int, rank: int) -> CompletionChoice:
        state = tracker.choices[prompt][index]
        text = "" if self.echo_only else state.text
        text = tracker.prompts[prompt].text + text if self.echo else text
        tokens, values = self._run(tracker, prompt, state.token_ids, state.logprobs, self.echo)
        logprobs = None if self.top_k is None else completion_logprobs(self.tokenizer, tokens, values, self.top_k)
        prompt_logprobs = tracker.prompt_logprobs[prompt]
        return CompletionChoice(
            index=prompt * self.n + rank,
            text=text,
            logprobs=logprobs,
            finish_reason="length" if self.echo_only else state.finish_reason,
            prompt_logprobs=None
            if self.prompt_top_k is None or prompt_logprobs is None
            else prompt_logprobs_extension(self.tokenizer, prompt_logprobs, self.prompt_top_k),
        )

    def chunk(self, prompt: int, chunk: GenerationChunk, tracker: Tracker) -> CompletionChunk:
        index = prompt * self.n + chunk.index
        echo = self.echo and index not in self.next_offset
        text = "" if self.echo_only else chunk.text
        text = tracker.prompts[prompt].text + text if echo else text
        logprobs = None
        if self.top_k is not None:
            tokens, values = self._run(tracker, prompt, chunk.token_ids, chunk.logprobs or (), echo)
            logprobs = completion_logprobs(self.tokenizer, tokens, values, self.top_k, self.next_offset.get(index, 0))
            if logprobs.tokens:
                self.next_offset[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        self.next_offset.setdefault(index, 0)
        finish = ("length" if chunk.finish_reason else None) if self.echo_only else chunk.finish_reason
        choice = CompletionStreamChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
        return CompletionChunk(id=self.id, model=self.model, choices=[choice])

    def usage_chunk(self, tracker: Tracker) -> CompletionChunk:
        return CompletionChunk(id=self.id, model=self.model, choices=[], usage=tracker.usage)

    def response(self, tracker: Tracker) -> CompletionResponse:
        choices = [
            self._choice(tracker, prompt, index, rank)
            for prompt in range(len(tracker.prompts))
            for rank, index in enumerate(tracker.best(prompt, self.n))
        ]
        return CompletionResponse(id=self.id, model=self.model, choices=choices, usage=tracker.usage)


class ChatShaper(Shaper):
    id_prefix = "chatcmpl"

    def __init__(self, model: str, tokenizer: ChatTokenizer, body: ChatCompletionRequest):
        super().__init__(model, tokenizer, body.n)
        self.top_k = (body.top_logprobs or 0) if body.logprobs else None

    def opening(self, tracker: Tracker) -> list[ChatCompletionChunk]:
        return [
            self._event(ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
            for i in range(self.n)
        ]

    def chunk(self, prompt: int, chunk: GenerationChunk, tracker: Tracker) -> ChatCompletionChunk:
        logprobs = None
        if self.top_k is not None:
            logprobs = chat_logprobs(self.tokenizer, chunk.token_ids, chunk.logprobs or (), self.top_k)
        delta = DeltaMessage(content=chunk.text)
        choice = ChatChunkChoice(index=chunk.index, delta=delta, logprobs=logprobs, finish_reason=chunk.finish_reason)
        return self._event(choice)

    def usage_chunk(self, tracker: Tracker) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, model=self.model, choices=[], usage=tracker.usage)

    def response(self, tracker: Tracker) -> ChatCompletionResponse:
        choices = []
        for index, state in enumerate(tracker.choices[0]):
            logprobs = None
            if self.top_k is not None:
                logprobs = chat_logprobs(self.tokenizer, state.token_ids, state.logprobs, self.top_k)
            message = AssistantMessage(content=state.text)
            finish = state.finish_reason
            choices.append(ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=finish))
        return ChatCompletionResponse(id=self.id, model=self.model, choices=choices, usage=tracker.usage)

    def _event(self, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, model=self.model, choices=[choice])
