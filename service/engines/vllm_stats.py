"""What one vLLM engine reports about itself after every step, read through vLLM's stat-logger hook.

AsyncLLM hands each engine step's `SchedulerStats` (running / waiting requests, KV-cache usage, the
LoRA adapters of its running and waiting requests) to every stat logger it was built with.
`EngineStats` keeps the latest of them and calls the engine's step observer (the scheduler's
forward counter) once per step that computed tokens.  vLLM's own Prometheus logger also runs; its
series live in prometheus_client's default registry, which the server does not export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from vllm.v1.metrics.loggers import StatLoggerBase

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.metrics.stats import IterationStats, MultiModalCacheStats, SchedulerStats


@dataclasses.dataclass
class EngineStats:
    """The latest numbers of one engine (all zero until its first step)."""

    kv_cache_usage: float = 0.0  # fraction of KV-cache blocks in use
    running_adapters: dict[str, int] = dataclasses.field(default_factory=dict)  # adapter -> running requests
    waiting_adapters: dict[str, int] = dataclasses.field(default_factory=dict)
    steps: int = 0
    observer: Callable[[int], None] | None = None  # called per step with the distinct adapters in it

    def record(self, scheduler: SchedulerStats | None, iteration: IterationStats | None) -> None:
        if scheduler is not None:
            self.kv_cache_usage = scheduler.kv_cache_usage
            self.running_adapters = dict(scheduler.running_lora_adapters)
            self.waiting_adapters = dict(scheduler.waiting_lora_adapters)
        if iteration is not None and (iteration.num_generation_tokens or iteration.num_prompt_tokens):
            self.steps += 1
            if self.observer is not None:
                self.observer(len(self.running_adapters))

    def logger_factory(self) -> Callable[[VllmConfig, int], StatLoggerBase]:
        """A vLLM StatLoggerFactory whose loggers write into this object."""
        stats = self

        class Recorder(StatLoggerBase):
            def __init__(self, vllm_config: VllmConfig, engine_index: int = 0):
                pass

            def record(
                self,
                scheduler_stats: SchedulerStats | None,
                iteration_stats: IterationStats | None,
                mm_cache_stats: MultiModalCacheStats | None = None,
                engine_idx: int = 0,
            ) -> None:
                stats.record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return Recorder
