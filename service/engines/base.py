"""The engine interface: start, load weights, generate, stop.  Engines never see HTTP.

An engine holds ONE set of dense weights at a time.  `load_weights` replaces named
tensors in place, read from safetensors files (a model's fused tensors, and the
base's original tensors for whatever must go back to the base); only the
scheduler calls it, and only when no request is running on that engine (SPEC §6).
Which tensors travel is decided by `service.engines.weights.SwapPlanner`.

Engines whose class sets `per_request_adapters` can also apply an adapter per
request (`GenerationRequest.adapter`, an `AdapterRef` to its per-request form,
merger.per_request) on top of the weights they hold, many adapters in one
batch; `adapter_slots` says how many distinct adapters one forward can mix.
Per-request adapters are exact on the BASE weights only: the scheduler sends
them only while the engine holds the base (no merged model swapped in).

An engine class is named in `service.engines.ENGINE_CLASSES`, built as
`engine_class(name)(settings)` and started with `await engine.start(base_dir)`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from service.settings import Settings


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n: must be >= 1, got {self.n}")


@dataclasses.dataclass(frozen=True)
class AdapterRef:
    """An adapter applied per request: its per-request form folder (merger.per_request.write_per_request_form).

    `id` names the folder's content in the engine's adapter caches (vLLM's lora_int_id): keep it for as long
    as the folder is unchanged, and give a replaced adapter a new one.
    """

    name: str
    id: int  # >= 1
    path: Path

    def __post_init__(self):
        if not isinstance(self.id, int) or isinstance(self.id, bool) or self.id < 1:
            raise ValueError(f"adapter id: must be an integer >= 1, got {self.id!r}")
        if not self.name:
            raise ValueError("adapter name: must not be empty")


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str  # plain text; a chat request arrives here with the chat template applied
    sampling: SamplingOptions
    adapter: AdapterRef | None = None  # None: the weights the engine holds (the base or a merged model)


@dataclasses.dataclass(frozen=True)
class GenerationChunk:
    index: int  # choice index, 0..n-1
    text: str  # text added since this choice's previous chunk
    new_tokens: int  # tokens generated in this chunk
    prompt_tokens: int
    finish_reason: str | None  # "stop" | "length" | None while running


@dataclasses.dataclass(frozen=True)
class TensorFile:
    """Some tensors of one safetensors file, by HF checkpoint name (e.g. model.layers.0.self_attn.q_proj.weight)."""

    path: Path
    names: tuple[str, ...]


class Engine(abc.ABC):
    name: ClassVar[str]
    per_request_adapters: ClassVar[bool] = False  # applies GenerationRequest.adapter, many adapters per batch

    def __init__(self, settings: Settings):
        self.settings = settings
        self.step_observer: Callable[[int], None] | None = None  # called after each forward: adapters in it

    @property
    def adapter_slots(self) -> int:
        """How many distinct per-request adapters one forward pass can mix; 0 when the engine applies none
        (or when D2LORA_SCHEDULER_MODE=merged, which never batches adapters)."""
        batching = self.per_request_adapters and self.settings.scheduler_mode != "merged"
        return self.settings.max_loras if batching else 0

    def _notify_step(self, adapters: int) -> None:
        """Tell the scheduler a forward ran, carrying `adapters` distinct per-request adapters."""
        if self.step_observer is not None:
            self.step_observer(adapters)

    def check_adapter(self, request: GenerationRequest) -> None:
        """Refuse a per-request adapter this engine cannot apply (it would otherwise serve other weights)."""
        if request.adapter is not None and not self.adapter_slots:
            raise ValueError(f"the {self.name} engine does not apply per-request adapters ({request.adapter.name})")

    async def add_adapter(self, adapter: AdapterRef) -> None:
        """Load and check an adapter's per-request form ahead of its first request (optional for an engine)."""
        raise ValueError(f"the {self.name} engine does not apply per-request adapters ({adapter.name})")

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        """Drop a cached per-request form (an adapter deleted or replaced)."""
        raise ValueError(f"the {self.name} engine does not apply per-request adapters ({adapter.name})")

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the engine's paged KV cache in use; 0.0 for an engine without one (transformers)."""
        return 0.0

    @abc.abstractmethod
    async def start(self, base_dir: Path) -> None: ...

    @abc.abstractmethod
    async def load_weights(self, files: Sequence[TensorFile]) -> None:
        """Replace the named tensors in place; every tensor not named keeps its value."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream text deltas; each choice's last chunk carries its finish_reason."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def apply_chat_template(self, messages: list[dict]) -> str: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @property
    def alive(self) -> bool:
        """False once the engine can serve no more (e.g. its worker process died); in-process engines live
        as long as the server does."""
        return True
