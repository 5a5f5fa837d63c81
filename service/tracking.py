"""What one request has produced so far, per prompt and choice, and when; its token metrics once it ends.

Token metrics are recorded here, where a request's arrival and its every chunk
are seen: prompt and generation tokens, time to first token, time per output
token after the first.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

from service import metrics
from service.engines.base import GenerationChunk, TokenLogprob
from service.prompts import PromptInput
from service.protocol import UsageInfo


@dataclasses.dataclass
class ChoiceState:
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None

    @property
    def mean_logprob(self) -> float:
        """best_of's ranking: the mean logprob of the sampled tokens (OpenAI's "log probability per token")."""
        return sum(lp.logprob for lp in self.logprobs) / len(self.logprobs) if self.logprobs else -math.inf


class Tracker:
    """`n` choices per prompt; `count_output` False: the output is not returned (echo with max_tokens 0)."""

    def __init__(self, model: str, prompts: Sequence[PromptInput], n: int, arrival: float, count_output: bool = True):
        self.model, self.prompts, self.n, self.arrival = model, list(prompts), n, arrival
        self.count_output = count_output
        self.choices = [[ChoiceState() for _ in range(n)] for _ in self.prompts]
        self.prompt_logprobs: list[tuple[TokenLogprob | None, ...] | None] = [None] * len(self.prompts)
        self.completion_tokens = 0
        self.first_token_at: float | None = None

    def add(self, prompt: int, chunk: GenerationChunk) -> None:
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs[prompt] = chunk.prompt_logprobs
        state = self.choices[prompt][chunk.index]
        state.finish_reason = chunk.finish_reason or state.finish_reason
        if not self.count_output:
            return
        if chunk.new_tokens and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            metrics.TIME_TO_FIRST_TOKEN.labels(model=self.model).observe(self.first_token_at - self.arrival)
        state.text += chunk.text
        state.token_ids += chunk.token_ids
        state.logprobs += chunk.logprobs or ()
        self.completion_tokens += chunk.new_tokens

    def best(self, prompt: int, count: int) -> list[int]:
        """The `count` choices of a prompt with the highest mean logprob, best first (all, in order, if count = n)."""
        if count >= self.n:
            return list(range(self.n))
        ranked = sorted(range(self.n), key=lambda i: -self.choices[prompt][i].mean_logprob)
        return ranked[:count]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(prompt.token_ids) for prompt in self.prompts)

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
        sequences = len(self.prompts) * self.n
        if self.first_token_at is not None and self.completion_tokens > sequences:
            decode = time.perf_counter() - self.first_token_at
            per_token = decode / (self.completion_tokens - sequences)
            metrics.TIME_PER_OUTPUT_TOKEN.labels(model=self.model).observe(per_token)
