"""Incremental detokenisation of one choice, with stop strings (as vLLM does it)."""

from __future__ import annotations

from service.engines.tokenizer import ChatTokenizer


class ChoiceText:
    """Tokens in, text deltas out; the text stops before the first stop string."""

    def __init__(self, tokenizer: ChatTokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1  # a stop string may still be forming
        self.token_ids: list[int] = []
        self.sent = 0  # characters of the text already returned
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, is_eos: bool, is_last: bool) -> str:
        """The text this token adds (possibly empty); sets finish_reason when the choice ends."""
        if not is_eos:
            self.token_ids.append(token)
        text = self.tokenizer.decode(self.token_ids)
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0 or is_eos:
            self.finish_reason = "stop"
            return self._send(text[:cut] if cut >= 0 else text)
        if is_last:
            self.finish_reason = "length"
            return self._send(text)
        ready = max(0, len(text) - self.holdback)
        return self._send(text[:ready].removesuffix("\ufffd"))  # an incomplete UTF-8 sequence waits

    def _send(self, text: str) -> str:
        delta = text[self.sent :] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return delta
