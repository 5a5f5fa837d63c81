"""The scheduler's exceptions: a leaf module, so the HTTP error layer needs nothing heavier."""

from __future__ import annotations

from merger.errors import D2LoraError


class QueueFullError(Exception):
    """Too many requests are waiting; the HTTP layer answers 429 with Retry-After."""

    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"{waiting} requests are already waiting; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class UnknownModelError(D2LoraError):
    """A model name the scheduler was never given (or that was removed)."""


class InvalidRequestError(D2LoraError):
    """The engine refused the request (e.g. prompt longer than max_model_len)."""
