"""Which target each slot should move to, from the queue: a registry of policies (D2LORA_SCHEDULER_MODE).

Common to all: a model with waiting requests that no slot serves (or is draining towards) is
*unserved*; it gets a free slot — an idle one (least recently used first), else one whose time
slice (`time_slice_s`, restarted while no rival waits) is over — moved to the model's preferred
target.  So no model waits much longer than a time slice plus one drain.

- `merged`: every model's preferred target is its own merged weights (one model per engine).
- `batched`: batchable models (the base, adapters with a per-request form) run together in batched
  mode; only a model without a per-request form gets merged weights.
- `auto` (default): batched, and merged for a model that has all the work: when a batched slot's
  running and waiting requests are all one adapter's and every request for `merged_after_s` has
  been that adapter's (its *streak*: a lone request after a quiet spell does not count), the slot
  moves to that adapter's merged weights (at once if it is idle, else after `merged_after_s` in its
  current target).  A rival's request then brings it back to batched within a time slice.

Policies only propose; the scheduler drains a slot before changing what it holds (SPEC §6).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

from merger.errors import D2LoraError
from service.scheduling.modes import BATCHED, ServedModel, Target, batched, merged
from service.scheduling.slots import Slot

Holds = Callable[[Slot, ServedModel], bool]  # whether a slot's engine now holds what a model needs


@dataclasses.dataclass(frozen=True)
class Demand:
    """The queue as the policy sees it."""

    now: float
    oldest_waiting: Mapping[str, float]  # model -> arrival of its oldest queued request
    streak: tuple[str, float] | None = None  # (model, since): every request that arrived since was model's


@dataclasses.dataclass(frozen=True)
class Timing:
    time_slice_s: float
    merged_after_s: float


class Policy(abc.ABC):
    name: ClassVar[str]

    def __init__(self, timing: Timing):
        self.timing = timing

    def initial(self, base: str) -> Target:
        """What every slot holds at start (the base's own weights either way)."""
        return batched()

    @abc.abstractmethod
    def preferred(self, model: ServedModel) -> Target:
        """Where `model`'s requests should run when no slot serves them."""

    def retarget(
        self, slots: Sequence[Slot], demand: Demand, models: Mapping[str, ServedModel], holds: Holds
    ) -> list[tuple[Slot, Target]]:
        """(slot, new target) for every slot that should change; `holds(slot, model)` says who serves whom."""
        changes: list[tuple[Slot, Target]] = []
        for name in sorted(demand.oldest_waiting, key=demand.oldest_waiting.__getitem__):
            model = models.get(name)
            if model is None or self._covered(slots, changes, model, holds):
                continue
            free = self._free_slot(slots, changes, demand.now)
            if free is None:
                break
            changes.append((free, self.preferred(model)))
        return changes

    def next_deadline(
        self, slots: Sequence[Slot], demand: Demand, models: Mapping[str, ServedModel], holds: Holds
    ) -> float | None:
        """When retarget may answer differently with no new event (a time slice ends), or None."""
        unserved = any(
            name in models and not self._covered(slots, [], models[name], holds) for name in demand.oldest_waiting
        )
        busy = [s.busy_since for s in slots if not s.draining and s.busy > 0]
        return min(busy) + self.timing.time_slice_s if unserved and busy else None

    @staticmethod
    def _covered(slots: Sequence[Slot], changes: list[tuple[Slot, Target]], model: ServedModel, holds: Holds) -> bool:
        serving = any(not s.draining and holds(s, model) for s in slots)
        heading = any(s.next is not None and s.next.serves(model) for s in slots)
        return serving or heading or any(target.serves(model) for _, target in changes)

    def _free_slot(self, slots: Sequence[Slot], changes: list[tuple[Slot, Target]], now: float) -> Slot | None:
        """An idle slot (least recently used), else one whose time slice is over."""
        taken = {id(slot) for slot, _ in changes}
        open_slots = [s for s in slots if not s.draining and id(s) not in taken]
        idle = [s for s in open_slots if s.busy == 0]
        if idle:
            return min(idle, key=lambda s: s.last_used)
        expired = [s for s in open_slots if now - s.busy_since >= self.timing.time_slice_s]
        return min(expired, key=lambda s: s.busy_since) if expired else None


class MergedPolicy(Policy):
    name = "merged"

    def initial(self, base: str) -> Target:
        return merged(base)

    def preferred(self, model: ServedModel) -> Target:
        return merged(model.name)


class BatchedPolicy(Policy):
    name = "batched"

    def preferred(self, model: ServedModel) -> Target:
        return batched() if model.batchable else merged(model.name)


class AutoPolicy(BatchedPolicy):
    name = "auto"

    def retarget(
        self, slots: Sequence[Slot], demand: Demand, models: Mapping[str, ServedModel], holds: Holds
    ) -> list[tuple[Slot, Target]]:
        changes = super().retarget(slots, demand, models, holds)
        taken = {id(slot) for slot, _ in changes}
        for slot in slots:
            if slot.draining or id(slot) in taken or slot.target.mode is not BATCHED:
                continue
            sole = self._sole_adapter(slot, demand, models)
            if sole is not None and (slot.busy == 0 or demand.now - slot.changed_at >= self.timing.merged_after_s):
                changes.append((slot, merged(sole)))
        return changes

    def next_deadline(
        self, slots: Sequence[Slot], demand: Demand, models: Mapping[str, ServedModel], holds: Holds
    ) -> float | None:
        deadlines = [super().next_deadline(slots, demand, models, holds)]
        for slot in slots:
            sole = None if slot.draining or slot.target.mode is not BATCHED else self._sole_model(slot, demand, models)
            if sole is not None and demand.streak is not None and demand.streak[0] == sole:
                since = max(demand.streak[1], slot.changed_at) if slot.busy else demand.streak[1]
                deadlines.append(since + self.timing.merged_after_s)
        known = [d for d in deadlines if d is not None]
        return min(known) if known else None

    @staticmethod
    def _sole_model(slot: Slot, demand: Demand, models: Mapping[str, ServedModel]) -> str | None:
        """The one adapter all of this slot's running and waiting work is for, or None."""
        present = {name for name, count in slot.running.items() if count} | set(demand.oldest_waiting)
        if len(present) != 1:
            return None
        (name,) = present
        model = models.get(name)
        return None if model is None or model.is_base else name

    def _sole_adapter(self, slot: Slot, demand: Demand, models: Mapping[str, ServedModel]) -> str | None:
        """The one adapter this slot's work is all for, every request for `merged_after_s` its own, or None."""
        name = self._sole_model(slot, demand, models)
        if name is None or demand.streak is None:
            return None
        model, since = demand.streak
        return name if model == name and demand.now - since >= self.timing.merged_after_s else None


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (AutoPolicy, BatchedPolicy, MergedPolicy)}


class PolicyError(D2LoraError):
    """The scheduler mode asks for something the engine cannot do."""


def choose_policy(mode: str, batching: bool, timing: Timing) -> Policy:
    """The policy D2LORA_SCHEDULER_MODE names; `auto` on an engine without per-request weights is `merged`."""
    if not batching and mode == "batched":
        raise PolicyError("D2LORA_SCHEDULER_MODE=batched needs an engine that applies per-request weights (vllm)")
    return POLICIES[mode if batching else "merged"](timing)
