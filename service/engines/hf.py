"""The `transformers` engine: a small reference engine on a plain HF model.

A manual decode loop with a KV cache; the n choices of a request decode as one
batch (same prompt, so no padding).  Requests take turns one decode step at a
time (a lock around each forward pass), each step runs in a thread so the event
loop stays free.  Weights are swapped by copying tensors into the parameters.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from merger.dtypes import COMPUTE_DTYPES
from service.engines.base import (
    Engine,
    GenerationChunk,
    GenerationRequest,
    SamplingOptions,
    TensorFile,
)
from service.engines.context import resolve_max_model_len
from service.engines.text import ChoiceText
from service.engines.tokenizer import ChatTokenizer


def next_tokens(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator) -> torch.Tensor:
    """Greedy at temperature 0, else nucleus sampling.  logits: (n, vocab) -> (n,)"""
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / options.temperature, dim=-1)  # (n, vocab)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > options.top_p  # keep the smallest set reaching top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0)
    picked = torch.multinomial(sorted_probs, 1, generator=generator)  # (n, 1)
    return order.gather(-1, picked).squeeze(-1)


class TransformersEngine(Engine):
    name = "transformers"

    async def start(self, base_dir: Path) -> None:
        self.max_model_len = resolve_max_model_len(self.settings, base_dir)
        self.tokenizer = ChatTokenizer(base_dir)
        self.model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=COMPUTE_DTYPES[self.settings.dtype]).eval()
        self.parameters = dict(self.model.named_parameters())
        self.step_lock = asyncio.Lock()
        self.aborted: set[str] = set()

    async def load_weights(self, files: Sequence[TensorFile]) -> None:
        async with self.step_lock:
            await asyncio.to_thread(self._copy_tensors, files)

    @torch.no_grad()
    def _copy_tensors(self, files: Sequence[TensorFile]) -> None:
        for file in files:
            with safe_open(file.path, framework="pt", device="cpu") as f:
                for name in file.names:
                    self.parameters[name].copy_(f.get_tensor(name))

    @torch.no_grad()
    def _forward(self, input_ids: torch.Tensor, cache) -> tuple[torch.Tensor, object]:
        """input_ids: (n, t) -> last logits (n, vocab) and the grown cache."""
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :], out.past_key_values

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self.check_adapter(request)  # this reference engine holds one set of weights and applies no adapter
        options = request.sampling
        prompt_ids = self.tokenizer.encode(request.prompt)
        budget = self._token_budget(len(prompt_ids), options.max_tokens)
        choices = [ChoiceText(self.tokenizer, options.stop) for _ in range(options.n)]
        generator = torch.Generator().manual_seed(options.seed if options.seed is not None else torch.seed())
        input_ids, cache = torch.tensor([prompt_ids] * options.n), None  # (n, prompt)
        try:
            for step in range(budget):
                if request.request_id in self.aborted:
                    return
                async with self.step_lock:
                    logits, cache = await asyncio.to_thread(self._forward, input_ids, cache)
                self._notify_step(0)
                input_ids = next_tokens(logits, options, generator).unsqueeze(1)  # (n, 1)
                last = step + 1 == budget
                for index, choice in enumerate(choices):
                    chunk = self._advance(choice, index, int(input_ids[index]), len(prompt_ids), last)
                    if chunk is not None:
                        yield chunk
                if all(choice.finished for choice in choices):
                    return
        finally:
            self.aborted.discard(request.request_id)

    def _token_budget(self, prompt_tokens: int, max_tokens: int) -> int:
        """max_tokens, cut so prompt + completion fit max_model_len (as vLLM does); an empty or too long prompt
        is refused (vLLM refuses both too)."""
        if prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        room = self.max_model_len - prompt_tokens
        if room < 1:
            raise ValueError(f"the prompt has {prompt_tokens} tokens; max_model_len is {self.max_model_len}")
        return min(max_tokens, room)

    def _advance(
        self, choice: ChoiceText, index: int, token: int, prompt_tokens: int, last: bool
    ) -> GenerationChunk | None:
        if choice.finished:
            return None
        text = choice.add(token, is_eos=token in self.tokenizer.eos_token_ids, is_last=last)
        return GenerationChunk(
            index=index, text=text, new_tokens=1, prompt_tokens=prompt_tokens, finish_reason=choice.finish_reason
        )

    async def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages)

    async def stop(self) -> None:
        del self.model, self.parameters
