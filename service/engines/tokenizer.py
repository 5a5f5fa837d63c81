"""The base model's tokenizer, as both engines use it: chat template and token counts."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer


class ChatTokenizer:
    def __init__(self, base_dir: Path):
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The prompt text of a chat, ending where the assistant's answer begins."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert isinstance(text, str)  # tokenize=False renders one conversation to one string
        return text

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def decode(self, token_ids: list[int]) -> str:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        assert isinstance(text, str)  # one sequence of ids decodes to one string
        return text

    @property
    def eos_token_ids(self) -> set[int]:
        return {self.tokenizer.eos_token_id} - {None}
