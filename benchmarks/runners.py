"""The two things the throughput benchmark asks of a serving path: score items, generate tokens.

`HfRunner` drives a transformers model (merged, or with the adapter unmerged);
`VllmRunner` drives the service's started vLLM engine (service.engines.vllm).
The engine's own `generate` takes text and the sampling options the HTTP API
exposes; the benchmark needs two more of vLLM's options, `prompt_logprobs` (to
score choices) and `ignore_eos` (to generate exactly N tokens), so it submits
token ids to the engine's AsyncLLM itself.  Both runners are async so that vLLM
requests can be in flight together; transformers calls simply block.
"""

from __future__ import annotations

import abc
import asyncio
import uuid
from collections.abc import Sequence

import torch
from torch import nn

from benchmarks.scoring import EncodedItem, left_padded, score_batch


class Runner(abc.ABC):
    @abc.abstractmethod
    async def score(self, items: Sequence[EncodedItem]) -> list[int]:
        """The chosen answer of every item, all items in flight together."""

    @abc.abstractmethod
    async def generate(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> int:
        """Greedily generate exactly new_tokens per prompt, all prompts together; tokens generated."""


class HfRunner(Runner):
    def __init__(self, model: nn.Module, pad_id: int):
        self.model, self.pad_id = model, pad_id

    async def score(self, items):
        return score_batch(self.model, items, self.pad_id).predictions()

    @torch.inference_mode()
    async def generate(self, prompts, new_tokens):
        input_ids, mask = left_padded(prompts, self.pad_id)  # (B, P)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
        )
        return (out.shape[1] - input_ids.shape[1]) * len(prompts)  # (B, P + new) -> tokens


def choice_logprob(prompt_logprobs: list, prompt_length: int, choice: Sequence[int]) -> float:
    """Sum of vLLM's prompt logprobs over the choice's tokens (entry i: {token: Logprob} of prompt token i)."""
    return sum(prompt_logprobs[prompt_length + j][token].logprob for j, token in enumerate(choice))


class VllmRunner(Runner):
    def __init__(self, engine):
        self.llm = engine.llm

    async def _final(self, token_ids: list[int], **options):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(temperature=0.0, output_kind=RequestOutputKind.FINAL_ONLY, **options)
        final = None
        async for output in self.llm.generate({"prompt_token_ids": token_ids}, params, uuid.uuid4().hex):
            final = output
        return final

    async def _choice_score(self, item: EncodedItem, choice: Sequence[int]) -> float:
        output = await self._final([*item.prompt_ids, *choice], max_tokens=1, prompt_logprobs=0)
        return choice_logprob(output.prompt_logprobs, len(item.prompt_ids), choice)

    async def score(self, items):
        scores = await asyncio.gather(*(self._choice_score(item, c) for item in items for c in item.choice_ids))
        answers, it = [], iter(scores)
        for item in items:
            mine = [next(it) for _ in item.choice_ids]
            answers.append(max(range(len(mine)), key=mine.__getitem__))
        return answers

    async def generate(self, prompts, new_tokens):
        outputs = await asyncio.gather(*(self._final(list(p), max_tokens=new_tokens, ignore_eos=True) for p in prompts))
        return sum(len(o.outputs[0].token_ids) for o in outputs)
