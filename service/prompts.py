"""A request's prompts as the engines receive them: text and token ids, each made from the other when missing.

Tokenising here, not in the engine, gives echo and logprobs the exact tokens the
model saw.  A completion's text is tokenised with the tokenizer's special tokens
(`add_special_tokens`, as vLLM), a chat's rendered template without (the
template writes them).  Token ids outside the vocabulary are refused (400).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from service.engines.base import GenerationRequest, SamplingOptions
from service.engines.tokenizer import ChatTokenizer
from service.protocol import APIError


@dataclasses.dataclass(frozen=True)
class PromptInput:
    text: str
    token_ids: tuple[int, ...]

    def request(self, request_id: str, options: SamplingOptions) -> GenerationRequest:
        return GenerationRequest(request_id, self.text, options, self.token_ids)


def check_token_ids(tokenizer: ChatTokenizer, param: str, token_ids: Sequence[int]) -> None:
    outside = [token for token in token_ids if token >= tokenizer.vocab_size]
    if outside:
        raise APIError(
            400,
            f"{param}: token ids {outside[:5]} are outside the vocabulary (0..{tokenizer.vocab_size - 1})",
            param=param,
            code="invalid_token_id",
        )


def text_prompt(tokenizer: ChatTokenizer, text: str, add_special_tokens: bool) -> PromptInput:
    token_ids = tuple(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    if not token_ids:
        raise APIError(400, "prompt: the prompt is empty", param="prompt", code="empty_prompt")
    return PromptInput(text, token_ids)


def token_prompt(tokenizer: ChatTokenizer, token_ids: Sequence[int], param: str = "prompt") -> PromptInput:
    """A prompt given as token ids; its text (for echo) is their decoding, special tokens kept."""
    check_token_ids(tokenizer, param, token_ids)
    return PromptInput(tokenizer.decode(token_ids, skip_special_tokens=False), tuple(token_ids))


def completion_prompts(
    tokenizer: ChatTokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], add_special_tokens: bool
) -> list[PromptInput]:
    return [
        text_prompt(tokenizer, prompt, add_special_tokens)
        if isinstance(prompt, str)
        else token_prompt(tokenizer, prompt)
        for prompt in prompts
    ]
