"""One HTTP request's prompts, each its own engine request through the scheduler, as one stream of chunks.

`start()` returns once every prompt has produced its first chunk, and raises
the first error any of them meets before that (a full queue, a prompt longer
than the context): such errors become an HTTP status, not a broken stream.
Iterating yields `(prompt index, chunk)` in arrival order.  `aclose()` stops
every prompt still running: its engine request is aborted and its slot freed
(the scheduler's `generate` does that when its generator is closed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from service.engines.base import GenerationChunk, GenerationRequest

Item = tuple[int, GenerationChunk | BaseException | None]  # None: that prompt is done


class Fanout:
    def __init__(self, scheduler, model: str, requests: Sequence[GenerationRequest]):
        self.scheduler, self.model, self.requests = scheduler, model, list(requests)
        self.items: asyncio.Queue[Item] = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.early: list[tuple[int, GenerationChunk]] = []  # chunks received while waiting in start()
        self.running = len(self.requests)

    async def _pump(self, index: int, request: GenerationRequest) -> None:
        try:
            async with contextlib.aclosing(self.scheduler.generate(self.model, request)) as chunks:
                async for chunk in chunks:
                    self.items.put_nowait((index, chunk))
        except Exception as err:
            self.items.put_nowait((index, err))
        else:
            self.items.put_nowait((index, None))

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(self._pump(i, r), name=r.request_id) for i, r in enumerate(self.requests)]
        waiting = set(range(len(self.requests)))
        try:
            while waiting:
                index, chunk = await self._next()
                waiting.discard(index)
                if chunk is not None:
                    self.early.append((index, chunk))
        except BaseException:
            await self.aclose()
            raise

    async def _next(self) -> tuple[int, GenerationChunk | None]:
        """The next chunk (None: a prompt ended); a prompt's error is raised here."""
        index, item = await self.items.get()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            self.running -= 1
        return index, item

    async def __aiter__(self) -> AsyncIterator[tuple[int, GenerationChunk]]:
        while self.early:
            yield self.early.pop(0)
        while self.running:
            index, chunk = await self._next()
            if chunk is not None:
                yield index, chunk

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
