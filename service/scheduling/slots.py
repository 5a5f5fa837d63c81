"""A slot: one engine, what it holds, and what runs on it."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

from service.engines.base import Engine
from service.scheduling.modes import Target


@dataclasses.dataclass(eq=False)
class Slot:
    """One engine holding the base plus `names` taken from `weights` (None: the base's own tensors)."""

    engine: Engine
    target: Target
    weights: Path | None = None
    names: frozenset[str] = frozenset()
    running: Counter[str] = dataclasses.field(default_factory=Counter)  # model -> requests running here
    busy_since: float = 0.0  # start of the current time slice
    last_used: float = 0.0
    changed_at: float = 0.0  # when the target last changed
    next: Target | None = None  # set while draining: the target it changes to once empty

    @property
    def draining(self) -> bool:
        return self.next is not None

    @property
    def busy(self) -> int:
        return sum(self.running.values())
