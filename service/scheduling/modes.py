"""What an engine holds, as a registry of small mode classes.

- **merged**: one model's fused weights are swapped into the engine (the base's own tensors for
  the base).  Only that model's requests run; no extra work per token.
- **batched**: the engine holds the base's weights and applies each request's adapter in the
  same forward (SPEC §1's per-request form: Ŵx = d ⊙ (W0x) + B̃Ax).  Any mix of batchable models
  shares one batch.

A `Target` is a mode plus, for merged, the model whose weights it holds.  Whether a slot serves a
model is the mode's question; the scheduler asks nothing else of it.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from service.engines.base import AdapterRef, GenerationRequest


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """A name the server answers to and the weights behind it."""

    name: str
    fused: Path | None = None  # fused target tensors (merged mode); None: the base itself
    adapter: AdapterRef | None = None  # per-request form (batched mode); None: the base, or not batchable

    @property
    def is_base(self) -> bool:
        return self.fused is None

    @property
    def batchable(self) -> bool:
        return self.is_base or self.adapter is not None


class SlotMode(abc.ABC):
    name: ClassVar[str]

    @abc.abstractmethod
    def serves(self, holder: str | None, model: ServedModel) -> bool:
        """Whether a slot in this mode (holding `holder`'s weights, for merged) may run `model`'s requests."""

    @abc.abstractmethod
    def weights(self, holder: str | None, models: Mapping[str, ServedModel]) -> Path | None:
        """The fused file the engine must hold (None: the base's own tensors)."""

    def request(self, model: ServedModel, request: GenerationRequest) -> GenerationRequest:
        """The request as this mode sends it to the engine."""
        return request


class MergedMode(SlotMode):
    name = "merged"

    def serves(self, holder: str | None, model: ServedModel) -> bool:
        return holder == model.name

    def weights(self, holder: str | None, models: Mapping[str, ServedModel]) -> Path | None:
        model = None if holder is None else models.get(holder)
        return None if model is None else model.fused


class BatchedMode(SlotMode):
    name = "batched"

    def serves(self, holder: str | None, model: ServedModel) -> bool:
        return model.batchable

    def weights(self, holder: str | None, models: Mapping[str, ServedModel]) -> Path | None:
        return None

    def request(self, model: ServedModel, request: GenerationRequest) -> GenerationRequest:
        return dataclasses.replace(request, adapter=model.adapter)


MODES: dict[str, SlotMode] = {mode.name: mode for mode in (MergedMode(), BatchedMode())}
MERGED, BATCHED = MODES["merged"], MODES["batched"]


@dataclasses.dataclass(frozen=True)
class Target:
    """What a slot holds or is draining towards."""

    mode: SlotMode
    holder: str | None = None  # merged: the model whose weights; batched: None

    def serves(self, model: ServedModel) -> bool:
        return self.mode.serves(self.holder, model)

    @property
    def label(self) -> str:
        return self.mode.name if self.holder is None else f"{self.mode.name}:{self.holder}"


def merged(model: str) -> Target:
    return Target(MERGED, model)


def batched() -> Target:
    return Target(BATCHED)
