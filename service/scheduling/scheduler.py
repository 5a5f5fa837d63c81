"""Per-model queues, slots and the dispatch loop.  SPEC §6's invariant lives here and only here.

Every request is served, from its first token to its last, by exactly the weights of the model it
named.  Each engine ("slot") holds a target (service.scheduling.modes): one model's merged weights,
or the base with per-request adapters applied in the same forward (batched).  A request is admitted
to a slot only while that slot's target serves its model and the engine holds the weights that
target needs, and the slot is not draining.  A change of target (a swap, or a mode change) first
stops admitting (drain), waits until the slot's last running request has finished or been aborted,
loads the weights the new target needs, and only then admits requests again.

Which slot goes where is the policy's (service.scheduling.policy, D2LORA_SCHEDULER_MODE); the
default `auto` batches every adapter that has a per-request form and gives one model merged weights
while it has all the work.

Which weights a model name means is looked up when its request is admitted, so a replaced adapter's
queued requests get the new version; a request already running finishes on the version it started with.

What the scheduler records: d2lora_swap_seconds{model}, d2lora_requests_running,
d2lora_requests_waiting, d2lora_resident_models, d2lora_forwards_total{mode},
d2lora_adapters_per_forward.  Token metrics (TTFT, time per output token, token counters) are the
HTTP layer's (service/inference.py).

`generate` is an async generator: QueueFullError and UnknownModelError come out of its first
`__anext__`, before any chunk.  Closing it early (a client that disconnects) aborts the engine
request and frees its slot.  `check_room` is the same admission test, asked by the HTTP layer before
it validates a body, resolves a model or renders a chat, so an overload is refused before any of
that work (and asked again when the request is queued).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from service import metrics
from service.engines.base import AdapterRef, Engine, GenerationChunk, GenerationRequest
from service.engines.weights import BaseTensors, SwapPlanner
from service.scheduling.errors import InvalidRequestError, QueueFullError, UnknownModelError
from service.scheduling.modes import ServedModel
from service.scheduling.policy import Demand, MergedPolicy, Policy, Timing, choose_policy
from service.scheduling.slots import Slot
from service.settings import Settings

if TYPE_CHECKING:
    from service.engines.tokenizer import ChatTokenizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Ticket:
    """One request waiting for its model's turn."""

    model: str
    arrived: float
    admitted: asyncio.Future


@dataclasses.dataclass(frozen=True)
class SchedulerState:
    """What the scheduler is doing now (a read-only snapshot, for the gateway metrics)."""

    running: int  # requests admitted to an engine
    waiting: int  # requests queued for their model's turn
    running_adapters: tuple[str, ...]  # adapters resident as merged weights or with requests running (base excluded)
    waiting_adapters: tuple[str, ...]  # adapters with queued requests
    max_lora: int  # adapters the engines hold at once: 1 per merged slot, its adapter slots per batched one
    kv_cache_usage: float  # the fullest engine's fraction of KV cache in use


class Scheduler:
    def __init__(self, settings: Settings, base_dir: Path, engine_factory: Callable[[], Engine]):
        self.settings = settings
        self.base_dir = Path(base_dir)
        self.base_name = self.base_dir.resolve().name
        self.engine_factory = engine_factory
        self.planner = SwapPlanner(BaseTensors(self.base_dir))
        self.models: dict[str, ServedModel] = {self.base_name: ServedModel(self.base_name)}
        self.queues: dict[str, deque[Ticket]] = {}
        self.streak: tuple[str, float] | None = None  # (model, since): every request since was model's
        self.slots: list[Slot] = []
        self.policy: Policy = MergedPolicy(self._timing())
        self.adapter_ids: dict[Path, int] = {}  # per-request form folder -> its engine-wide id (AdapterRef.id)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    @classmethod
    async def create(cls, settings: Settings, base_dir: Path, engine_factory: Callable[[], Engine]) -> Scheduler:
        scheduler = cls(settings, base_dir, engine_factory)
        await scheduler.start()
        return scheduler

    def _timing(self) -> Timing:
        return Timing(self.settings.time_slice_s, self.settings.merged_after_s)

    async def start(self) -> None:
        """Start `max_resident` engines, each holding the base, pick the policy, start the dispatch loop."""
        engines = [self.engine_factory() for _ in range(self.settings.max_resident)]
        for engine in engines:
            await engine.start(self.base_dir)
        batching = all(engine.adapter_slots > 0 for engine in engines)
        self.policy = choose_policy(self.settings.scheduler_mode, batching, self._timing())
        for engine in engines:
            slot = Slot(engine, self.policy.initial(self.base_name))
            engine.step_observer = functools.partial(self._observe_step, slot)
            self.slots.append(slot)
        logger.info("scheduler: %s policy over %d engine(s)", self.policy.name, len(self.slots))
        self._loop_task = asyncio.create_task(self._dispatch_forever(), name="d2lora-scheduler")
        self._update_gauges()

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for ticket in [t for queue in self.queues.values() for t in queue]:
            _fail(ticket, UnknownModelError("the server is shutting down"))
        for slot in self.slots:
            await slot.engine.stop()

    # models -------------------------------------------------------------------------------------------

    async def add_model(self, name: str, tensors_file: Path, form_dir: Path | None = None) -> None:
        """Serve `name` from a fused tensors file and, when given, its per-request form (replacing older ones).

        A form the engines cannot apply (a rank above D2LORA_MAX_LORA_RANK, a broken folder) is logged and
        left out: the model is then served with its merged weights only.
        """
        self.planner.names_of(tensors_file)  # a file that does not fit the base fails here, not at swap time
        adapter = None if form_dir is None or not self.batching else await self._checked_form(name, Path(form_dir))
        self.models[name] = ServedModel(name, Path(tensors_file), adapter)
        self._wake.set()

    @property
    def batching(self) -> bool:
        """Whether the engines apply per-request adapters (the policy may then batch adapters together)."""
        return bool(self.slots) and all(slot.engine.adapter_slots > 0 for slot in self.slots)

    async def _checked_form(self, name: str, folder: Path) -> AdapterRef | None:
        adapter = AdapterRef(name, self._adapter_id(folder), folder)
        try:
            for slot in self.slots:
                await slot.engine.add_adapter(adapter)
        except ValueError as err:
            logger.warning("adapter %s: served with merged weights only (%s)", name, err)
            return None
        return adapter

    def _adapter_id(self, folder: Path) -> int:
        return self.adapter_ids.setdefault(folder, len(self.adapter_ids) + 1)

    def serves(self, name: str, tensors_file: Path) -> bool:
        """Whether `name` is served from this fused tensors file (a newer version has another)."""
        model = self.models.get(name)
        return model is not None and model.fused == Path(tensors_file)

    async def remove_model(self, name: str) -> None:
        """Stop serving `name`: its queued requests fail, running ones finish."""
        self.models.pop(name, None)
        self._fail_queue(name, UnknownModelError(f"the model {name!r} was removed"))

    def state(self) -> SchedulerState:
        adapters = set(self.models) - {self.base_name}
        holders = {slot.target.holder for slot in self.slots if slot.target.holder is not None}
        running = holders | {model for slot in self.slots for model, count in slot.running.items() if count}
        return SchedulerState(
            running=sum(slot.busy for slot in self.slots),
            waiting=sum(len(queue) for queue in self.queues.values()),
            running_adapters=tuple(sorted(running & adapters)),
            waiting_adapters=tuple(sorted(m for m, queue in self.queues.items() if queue and m in adapters)),
            max_lora=sum(slot.engine.adapter_slots if slot.target.holder is None else 1 for slot in self.slots),
            kv_cache_usage=max((slot.engine.kv_cache_usage for slot in self.slots), default=0.0),
        )

    def resident_models(self) -> list[str]:
        """The models whose weights are in an engine now: each merged slot's model, the base for batched ones."""
        return sorted({slot.target.holder or self.base_name for slot in self.slots})

    @property
    def alive(self) -> bool:
        return all(slot.engine.alive for slot in self.slots)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self.slots[0].engine.apply_chat_template(messages)

    @property
    def tokenizer(self) -> ChatTokenizer:
        """The base model's tokenizer (every slot's engine has the same)."""
        return self.slots[0].engine.tokenizer

    @property
    def features(self) -> frozenset[str]:
        """The optional sampling features the engines implement (Engine.features)."""
        return self.slots[0].engine.features

    @property
    def engine_name(self) -> str:
        return self.slots[0].engine.name

    # requests -----------------------------------------------------------------------------------------

    async def generate(self, model: str, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Chunks of `request`, served wholly by `model`'s weights."""
        ticket = self._enqueue(model)
        slot, served = await self._admission(ticket)
        finished = set()
        try:
            chunks = slot.engine.generate(slot.target.mode.request(served, request))
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    if chunk.finish_reason is not None:
                        finished.add(chunk.index)
                    yield chunk
        except ValueError as err:  # vLLM's validation errors are ValueErrors
            raise InvalidRequestError(str(err)) from err
        finally:
            if len(finished) < request.sampling.n:
                await slot.engine.abort(request.request_id)
            self._release(slot, model)

    def check_room(self) -> None:
        """QueueFullError if a request arriving now would be refused; the HTTP layer asks before any work on a body.

        The places engines have free count as room: a burst that arrives before the dispatcher's next turn
        is queued for a moment, yet max_num_seqs of it are about to run, not wait.
        """
        waiting = sum(len(queue) for queue in self.queues.values())
        free = sum(max(0, self.settings.max_num_seqs - slot.busy) for slot in self.slots if not slot.draining)
        if waiting - free >= self.settings.max_waiting:
            raise QueueFullError(waiting, max(1, math.ceil(self.settings.time_slice_s)))

    def _enqueue(self, model: str) -> Ticket:
        if model not in self.models:
            raise UnknownModelError(f"the model {model!r} is not served")
        self.check_room()
        ticket = Ticket(model, time.monotonic(), asyncio.get_running_loop().create_future())
        self.queues.setdefault(model, deque()).append(ticket)
        if self.streak is None or self.streak[0] != model:
            self.streak = (model, ticket.arrived)
        self._update_gauges()
        self._wake.set()
        return ticket

    async def _admission(self, ticket: Ticket) -> tuple[Slot, ServedModel]:
        """Wait for the dispatcher to admit the ticket; a cancelled wait leaves no trace."""
        try:
            return await asyncio.shield(ticket.admitted)
        except asyncio.CancelledError:
            if ticket.admitted.done() and not ticket.admitted.cancelled() and ticket.admitted.exception() is None:
                self._release(ticket.admitted.result()[0], ticket.model)
            else:
                self._forget(ticket)
            raise

    def _forget(self, ticket: Ticket) -> None:
        queue = self.queues.get(ticket.model)
        if queue is not None and ticket in queue:
            queue.remove(ticket)
        ticket.admitted.cancel()
        self._update_gauges()
        self._wake.set()

    def _release(self, slot: Slot, model: str) -> None:
        slot.running[model] -= 1
        if slot.running[model] <= 0:
            del slot.running[model]
        slot.last_used = time.monotonic()
        self._update_gauges()
        self._wake.set()

    # dispatch -----------------------------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._dispatch()
            except Exception:
                logger.exception("scheduler dispatch failed")
            deadline = self.policy.next_deadline(self.slots, self._demand(), self.models, self._holds)
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _dispatch(self) -> None:
        for slot, target in self.policy.retarget(self.slots, self._demand(), self.models, self._holds):
            slot.next = target
        for slot in self.slots:
            if slot.next is not None and slot.busy == 0:
                await self._change(slot)
        now = time.monotonic()
        for slot in self.slots:
            if not slot.draining:
                self._admit(slot, now)

    def _demand(self) -> Demand:
        oldest = {model: queue[0].arrived for model, queue in self.queues.items() if queue}
        return Demand(time.monotonic(), oldest, self.streak)

    def _admit(self, slot: Slot, now: float) -> None:
        """Admit queued requests this slot serves, up to max_num_seqs running.

        The rest wait in the bounded queue, so an overload is answered 429 instead of piling up in the engine.
        """
        for name, queue in self.queues.items():
            model = self.models.get(name)
            while queue and model is not None and self._holds(slot, model) and slot.busy < self.settings.max_num_seqs:
                if slot.busy == 0 and not self._unserved_waiting():
                    slot.busy_since = now  # the slice restarts only while no other model waits
                ticket = queue.popleft()
                slot.running[name] += 1
                ticket.admitted.set_result((slot, model))
        self._update_gauges()

    def _holds(self, slot: Slot, model: ServedModel) -> bool:
        """The slot's target serves `model` and its engine holds the weights that target needs now."""
        return slot.target.serves(model) and slot.weights == slot.target.mode.weights(slot.target.holder, self.models)

    def _unserved_waiting(self) -> bool:
        return any(
            name in self.models and not any(not s.draining and self._holds(s, self.models[name]) for s in self.slots)
            for name, queue in self.queues.items()
            if queue
        )

    async def _change(self, slot: Slot) -> None:
        """Move the (empty) slot to its next target, loading the weights it needs; on failure fail its queue."""
        target, slot.next = slot.next, None
        if target is None or (target.holder is not None and target.holder not in self.models):
            return
        weights, start = target.mode.weights(target.holder, self.models), time.perf_counter()
        try:
            if weights != slot.weights:
                names = self.planner.names_of(weights)  # a bad or vanished file fails here, engine untouched
                await self._load(slot, self.planner.plan(slot.names, weights), names)
                metrics.SWAP_SECONDS.labels(model=target.holder or self.base_name).observe(time.perf_counter() - start)
        except Exception as err:
            logger.error("changing to %s failed: %s", target.label, err)
            if target.holder is not None:
                self._fail_queue(target.holder, err)
            return
        slot.target, slot.weights = target, weights
        slot.busy_since = slot.changed_at = time.monotonic()
        logger.info("engine now holds %s", target.label)

    async def _load(self, slot: Slot, files: list, names: frozenset[str]) -> None:
        """Load into the engine; if that fails midway, put the base back for every name either side touched."""
        try:
            await slot.engine.load_weights(files)
        except Exception:
            await slot.engine.load_weights(self.planner.base.slices(slot.names | names))
            slot.target, slot.weights, slot.names = self.policy.initial(self.base_name), None, frozenset()
            raise
        slot.names = names

    def _fail_queue(self, model: str, err: Exception) -> None:
        for ticket in self.queues.pop(model, deque()):
            _fail(ticket, err)
        self._update_gauges()

    def _observe_step(self, slot: Slot, adapters: int) -> None:
        """Called by the engine after each forward: how many per-request adapters it carried."""
        metrics.FORWARDS.labels(mode=slot.target.mode.name).inc()
        metrics.ADAPTERS_PER_FORWARD.observe(adapters)

    def _update_gauges(self) -> None:
        metrics.REQUESTS_WAITING.set(sum(len(queue) for queue in self.queues.values()))
        metrics.REQUESTS_RUNNING.set(sum(slot.busy for slot in self.slots))
        metrics.RESIDENT_MODELS.set(len({slot.weights for slot in self.slots}))


def _fail(ticket: Ticket, err: Exception) -> None:
    if not ticket.admitted.done():
        ticket.admitted.set_exception(err)
