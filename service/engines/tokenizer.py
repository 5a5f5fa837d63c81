"""The base model's tokenizer, as the engines and the HTTP layer use it: chat template, tokens, token texts."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer


class ChatTokenizer:
    def __init__(self, base_dir: Path):
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, continue_final_message: bool = False
    ) -> str:
        """The prompt text of a chat, by default ending where the assistant's answer begins."""
        text = self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )
        assert isinstance(text, str)  # tokenize=False renders one conversation to one string
        return text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        assert isinstance(text, str)  # one sequence of ids decodes to one string
        return text

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each token decoded on its own, special tokens included (as vLLM reports tokens in logprobs)."""
        return [self._token_text(token_id) for token_id in token_ids]

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019  (one tokenizer per engine, alive as long as the server)
    def _token_text(self, token_id: int) -> str:
        return self.decode([token_id], skip_special_tokens=False)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """The vocabulary's own strings of the tokens (e.g. 'Ġcapital'), as vLLM's /tokenize returns them."""
        return list(self.tokenizer.convert_ids_to_tokens(list(token_ids)))

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1 (added tokens included)."""
        return len(self.tokenizer)

    @property
    def eos_token_ids(self) -> set[int]:
        return {self.tokenizer.eos_token_id} - {None}
