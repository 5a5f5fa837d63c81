"""The engine interface: start, load weights, generate, stop.  Engines never see HTTP.

An engine holds ONE set of weights at a time.  `load_weights` replaces the
targeted tensors in place from a safetensors file (fused adapter tensors, or the
base's original tensors to go back); only the scheduler calls it, and only when
no request is running on that engine (SPEC §6).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str  # plain text; a chat request arrives here with the chat template applied
    sampling: SamplingOptions


@dataclasses.dataclass(frozen=True)
class GenerationChunk:
    index: int  # choice index, 0..n-1
    text: str  # text added since this choice's previous chunk
    new_tokens: int  # tokens generated in this chunk
    prompt_tokens: int
    finish_reason: str | None  # "stop" | "length" | None while running


class Engine(abc.ABC):
    name: ClassVar[str]

    @abc.abstractmethod
    async def start(self, base_dir: Path) -> None: ...

    @abc.abstractmethod
    async def load_weights(self, tensors_file: Path) -> None:
        """Replace the named tensors (HF checkpoint names) in place from a safetensors file."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def apply_chat_template(self, messages: list[dict]) -> str: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...


ENGINES: dict[str, type[Engine]] = {}


def register_engine(cls: type[Engine]) -> type[Engine]:
    ENGINES[cls.name] = cls
    return cls
