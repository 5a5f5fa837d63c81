"""Per-model queues and the swap policy.  SPEC §6's invariant lives here and only here.

Every request is served, from its first token to its last, by exactly the
weights of the model it named.  Each engine ("slot") holds one model's weights;
a request is admitted to a slot only while that slot holds its model's weights
and is not draining.  A swap first stops admitting (drain), waits until the
slot's last running request has finished or been aborted, loads the next
model's tensors, and only then admits that model's requests.

Policy: a slot keeps its model while that model has work (running or queued),
up to `time_slice_s` since it was swapped in (or since it last had no rival
waiting), while requests of other models wait; then it drains and goes to the
model whose request has waited longest.  Back-to-back requests of one model
therefore cannot hold a slot past the slice once another model is waiting.
An idle slot is handed over at once (least recently used first), and a
request whose model is already resident in a slot goes there with no swap.
So no model waits much longer than a time slice plus one drain.

Which weights a model name means is looked up when its request is admitted,
so a replaced adapter's queued requests get the new version; a request already
running finishes on the version it started with.

What the scheduler records: d2lora_swap_seconds{model}, d2lora_requests_running,
d2lora_requests_waiting, d2lora_resident_models.  Token metrics (TTFT, time per
output token, token counters) are the HTTP layer's (service/inference.py).

`generate` is an async generator: QueueFullError and UnknownModelError come
out of its first `__anext__`, before any chunk.  Closing it early (a client
that disconnects) aborts the engine request and frees its slot.  `check_room`
is the same admission test, asked by the HTTP layer before it validates a
body, resolves a model or renders a chat, so an overload is refused before any
of that work (and asked again when the request is queued).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

from service import metrics
from service.engines.base import Engine, GenerationChunk, GenerationRequest
from service.engines.weights import BaseTensors, SwapPlanner
from service.scheduling.errors import InvalidRequestError, QueueFullError, UnknownModelError
from service.settings import Settings

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Ticket:
    """One request waiting for its model's turn."""

    model: str
    arrived: float
    admitted: asyncio.Future


@dataclasses.dataclass(eq=False)
class Slot:
    """One engine and the weights it holds: the base plus `names` taken from `weights` (None: the base)."""

    engine: Engine
    model: str
    weights: Path | None = None
    names: frozenset[str] = frozenset()
    running: int = 0
    busy_since: float = 0.0
    last_used: float = 0.0
    next_model: str | None = None  # set while draining: the model it swaps to once empty

    @property
    def draining(self) -> bool:
        return self.next_model is not None


class Scheduler:
    def __init__(self, settings: Settings, base_dir: Path, engine_factory: Callable[[], Engine]):
        self.settings = settings
        self.base_dir = Path(base_dir)
        self.base_name = self.base_dir.resolve().name
        self.engine_factory = engine_factory
        self.planner = SwapPlanner(BaseTensors(self.base_dir))
        self.models: dict[str, Path | None] = {self.base_name: None}  # name -> fused tensors file
        self.queues: dict[str, deque[Ticket]] = {}
        self.slots: list[Slot] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    @classmethod
    async def create(cls, settings: Settings, base_dir: Path, engine_factory: Callable[[], Engine]) -> Scheduler:
        scheduler = cls(settings, base_dir, engine_factory)
        await scheduler.start()
        return scheduler

    async def start(self) -> None:
        """Start `max_resident` engines, each holding the base, and the dispatch loop."""
        for _ in range(self.settings.max_resident):
            engine = self.engine_factory()
            await engine.start(self.base_dir)
            self.slots.append(Slot(engine, self.base_name))
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

    async def add_model(self, name: str, tensors_file: Path) -> None:
        """Serve `name` from a fused tensors file (replacing its previous file, if any)."""
        self.planner.names_of(tensors_file)  # a file that does not fit the base fails here, not at swap time
        self.models[name] = Path(tensors_file)
        self._wake.set()

    def serves(self, name: str, tensors_file: Path) -> bool:
        return self.models.get(name) == Path(tensors_file)

    async def remove_model(self, name: str) -> None:
        """Stop serving `name`: its queued requests fail, running ones finish."""
        self.models.pop(name, None)
        self._fail_queue(name, UnknownModelError(f"the model {name!r} was removed"))

    @property
    def alive(self) -> bool:
        return all(slot.engine.alive for slot in self.slots)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self.slots[0].engine.apply_chat_template(messages)

    # requests -----------------------------------------------------------------------------------------

    async def generate(self, model: str, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Chunks of `request`, served wholly by `model`'s weights."""
        ticket = self._enqueue(model)
        slot = await self._admission(ticket)
        finished = set()
        try:
            async with contextlib.aclosing(slot.engine.generate(request)) as chunks:
                async for chunk in chunks:
                    if chunk.finish_reason is not None:
                        finished.add(chunk.index)
                    yield chunk
        except ValueError as err:  # vLLM's validation errors are ValueErrors
            raise InvalidRequestError(str(err)) from err
        finally:
            if len(finished) < request.sampling.n:
                await slot.engine.abort(request.request_id)
            self._release(slot)

    def check_room(self) -> None:
        """QueueFullError if a request arriving now would be refused; the HTTP layer asks before any work on a body."""
        waiting = sum(len(queue) for queue in self.queues.values())
        if waiting >= self.settings.max_waiting:
            raise QueueFullError(waiting, max(1, math.ceil(self.settings.time_slice_s)))

    def _enqueue(self, model: str) -> Ticket:
        if model not in self.models:
            raise UnknownModelError(f"the model {model!r} is not served")
        self.check_room()
        ticket = Ticket(model, time.monotonic(), asyncio.get_running_loop().create_future())
        self.queues.setdefault(model, deque()).append(ticket)
        self._update_gauges()
        self._wake.set()
        return ticket

    async def _admission(self, ticket: Ticket) -> Slot:
        """Wait for the dispatcher to admit the ticket; a cancelled wait leaves no trace."""
        try:
            return await asyncio.shield(ticket.admitted)
        except asyncio.CancelledError:
            if ticket.admitted.done() and not ticket.admitted.cancelled() and ticket.admitted.exception() is None:
                self._release(ticket.admitted.result())
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

    def _release(self, slot: Slot) -> None:
        slot.running -= 1
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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._seconds_to_next_deadline())

    async def _dispatch(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if not slot.draining:
                self._admit(slot, now)
        for slot in self.slots:
            if slot.draining and slot.running == 0:
                await self._swap(slot)
        while (model := self._oldest_unserved()) is not None and (free := self._free_slot(now)) is not None:
            free.next_model = model
            if free.running == 0:
                await self._swap(free)

    def _admit(self, slot: Slot, now: float) -> None:
        """Admit queued requests whose model's weights this slot holds, up to max_num_seqs running.

        The rest wait in the bounded queue, so an overload is answered 429 instead of piling up in the engine.
        """
        for model, queue in self.queues.items():
            while queue and self._holds(slot, model) and slot.running < self.settings.max_num_seqs:
                if slot.running == 0 and self._oldest_unserved() is None:
                    slot.busy_since = now  # the slice restarts only while no other model waits
                ticket = queue.popleft()
                slot.running += 1
                ticket.admitted.set_result(slot)
        self._update_gauges()

    def _holds(self, slot: Slot, model: str) -> bool:
        return model in self.models and slot.weights == self.models[model]

    def _oldest_unserved(self) -> str | None:
        """The model with the longest-waiting request that no slot serves or is draining for."""
        claimed = {slot.next_model for slot in self.slots}
        served = {m for m in self.models for s in self.slots if not s.draining and self._holds(s, m)}
        heads = [(q[0].arrived, m) for m, q in self.queues.items() if q and m not in claimed | served]
        return min(heads)[1] if heads else None

    def _free_slot(self, now: float) -> Slot | None:
        """An idle slot (least recently used), else one whose time slice is over."""
        open_slots = [s for s in self.slots if not s.draining]
        idle = [s for s in open_slots if s.running == 0]
        if idle:
            return min(idle, key=lambda s: s.last_used)
        expired = [s for s in open_slots if now - s.busy_since >= self.settings.time_slice_s]
        return min(expired, key=lambda s: s.busy_since) if expired else None

    def _seconds_to_next_deadline(self) -> float | None:
        """When a busy slot's time slice ends, if someone is waiting for a slot."""
        if self._oldest_unserved() is None:
            return None
        busy = [s.busy_since for s in self.slots if not s.draining and s.running > 0]
        return max(0.0, min(busy) + self.settings.time_slice_s - time.monotonic()) if busy else None

    async def _swap(self, slot: Slot) -> None:
        """Load `slot.next_model`'s weights into the (empty) slot; on failure fail its queued requests."""
        model, slot.next_model = slot.next_model, None
        if model not in self.models:
            return
        weights, start = self.models[model], time.perf_counter()
        try:
            names = self.planner.names_of(weights)  # a bad or vanished file fails here, engine untouched
            await self._load(slot, self.planner.plan(slot.names, weights), names)
        except Exception as err:
            logger.error("swap to %s failed: %s", model, err)
            self._fail_queue(model, err)
            return
        slot.model, slot.weights, slot.busy_since = model, weights, time.monotonic()
        metrics.SWAP_SECONDS.labels(model=model).observe(time.perf_counter() - start)
        self._admit(slot, time.monotonic())

    async def _load(self, slot: Slot, files: list, names: frozenset[str]) -> None:
        """Load into the engine; if that fails midway, put the base back for every name either side touched."""
        try:
            await slot.engine.load_weights(files)
        except Exception:
            await slot.engine.load_weights(self.planner.base.slices(slot.names | names))
            slot.model, slot.weights, slot.names = self.base_name, None, frozenset()
            raise
        slot.names = names

    def _fail_queue(self, model: str, err: Exception) -> None:
        for ticket in self.queues.pop(model, deque()):
            _fail(ticket, err)
        self._update_gauges()

    def _update_gauges(self) -> None:
        metrics.REQUESTS_WAITING.set(sum(len(queue) for queue in self.queues.values()))
        metrics.REQUESTS_RUNNING.set(sum(slot.running for slot in self.slots))
        metrics.RESIDENT_MODELS.set(len({slot.weights for slot in self.slots}))


def _fail(ticket: Ticket, err: Exception) -> None:
    if not ticket.admitted.done():
        ticket.admitted.set_exception(err)
