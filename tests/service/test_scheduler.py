"""The scheduler's promises: SPEC §6 under concurrency, no starvation, disconnects free their slot, a full
queue refuses, unknown models are refused."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from service import metrics
from service.scheduling.errors import QueueFullError, UnknownModelError
from tests.service.conftest import PROMPTS
from tests.service.test_engines import complete, request

pytestmark = pytest.mark.slow  # a live server or engine per module (tests/conftest.py: the tiers)


def gauge(g) -> float:
    return g._value.get()


async def settle(scheduler, seconds: float = 5.0) -> None:
    """Wait until nothing runs or waits (the dispatcher reacts to releases asynchronously)."""
    deadline = time.monotonic() + seconds
    while (gauge(metrics.REQUESTS_RUNNING) or gauge(metrics.REQUESTS_WAITING)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def test_concurrent_requests_each_get_their_own_models_answer(event_loop_thread, scheduler, references):
    models = [scheduler.base_name, "qv", "qkvo", "o-mlp"]
    jobs = [(model, i) for i, model in itertools.product(range(len(PROMPTS)), models)]

    async def run():
        done = await asyncio.gather(*(complete(scheduler, model, PROMPTS[i]) for model, i in jobs))
        return [answer[0][0] for answer in done]

    got = event_loop_thread.run(run())
    assert got == [references[model][i] for model, i in jobs]
    assert gauge(metrics.REQUESTS_RUNNING) == 0 and gauge(metrics.REQUESTS_WAITING) == 0


def test_a_steady_stream_does_not_starve_another_model(event_loop_thread, vllm_scheduler):
    """Back-to-back batches of "qv" (counted, not timed: the machine's speed does not matter) must not keep "o-mlp"
    waiting until the stream is over: "o-mlp" gets the engine once qv's time slice ends."""
    scheduler = vllm_scheduler

    async def steady_stream(batches: int) -> float:
        for _ in range(batches):
            await asyncio.gather(*(complete(scheduler, "qv", PROMPTS[0], max_tokens=6) for _ in range(2)))
        return time.monotonic()

    async def run():
        await complete(scheduler, "qv", PROMPTS[0], max_tokens=1)  # "qv" resident before the stream starts
        stream = asyncio.create_task(steady_stream(batches=5))
        await asyncio.sleep(scheduler.settings.time_slice_s / 2)
        await complete(scheduler, "o-mlp", PROMPTS[1], max_tokens=2)
        other_done = time.monotonic()
        return await stream - other_done

    assert event_loop_thread.run(run()) > 0  # "o-mlp" finished while "qv" still had batches to send


def test_a_client_that_disconnects_frees_its_slot(event_loop_thread, scheduler):
    async def run():
        stream = scheduler.generate("qkvo", request(PROMPTS[2], max_tokens=400))
        await anext(stream)
        running_mid_stream = gauge(metrics.REQUESTS_RUNNING)
        await stream.aclose()
        await settle(scheduler)
        return running_mid_stream, gauge(metrics.REQUESTS_RUNNING)

    assert event_loop_thread.run(run()) == (1, 0)


def test_a_request_cancelled_while_queued_leaves_the_queue(event_loop_thread, scheduler):
    async def run():
        await complete(scheduler, "qv", PROMPTS[0], max_tokens=1)  # "qv" resident: "o-mlp" must queue behind it
        busy = asyncio.create_task(complete(scheduler, "qv", PROMPTS[0], max_tokens=64))
        await asyncio.sleep(0)
        queued = asyncio.create_task(complete(scheduler, "o-mlp", PROMPTS[1]))
        await asyncio.sleep(0.01)
        queued.cancel()
        await asyncio.gather(busy, queued, return_exceptions=True)
        await settle(scheduler)
        return gauge(metrics.REQUESTS_WAITING), gauge(metrics.REQUESTS_RUNNING)

    assert event_loop_thread.run(run()) == (0, 0)


def test_a_burst_fills_the_running_and_waiting_places_and_the_next_is_refused_with_a_retry_hint(
    event_loop_thread, scheduler
):
    room = scheduler.settings.max_num_seqs * len(scheduler.slots) + scheduler.settings.max_waiting

    async def run():
        streams = [scheduler.generate("qv", request(PROMPTS[0], max_tokens=2)) for _ in range(room + 1)]
        firsts = [asyncio.ensure_future(anext(s)) for s in streams]
        await asyncio.sleep(0.05)  # every request has been queued or refused; at most max_num_seqs run
        results = [f.exception() if f.done() and not f.cancelled() else None for f in firsts]
        for first, s in zip(firsts, streams, strict=True):
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            await s.aclose()
        await settle(scheduler)
        return results

    refused = [r for r in event_loop_thread.run(run()) if isinstance(r, QueueFullError)]
    assert len(refused) == 1 and refused[0].retry_after_s >= 1


def test_an_unknown_model_is_refused(event_loop_thread, scheduler):
    with pytest.raises(UnknownModelError, match="nope"):
        event_loop_thread.run(complete(scheduler, "nope", PROMPTS[0]))


def test_a_removed_model_is_refused_and_a_readded_one_serves_again(event_loop_thread, scheduler, adapters, references):
    event_loop_thread.run(scheduler.remove_model("o-mlp"))
    with pytest.raises(UnknownModelError):
        event_loop_thread.run(complete(scheduler, "o-mlp", PROMPTS[0]))
    event_loop_thread.run(scheduler.add_model("o-mlp", adapters["o-mlp"].fused, adapters["o-mlp"].form))
    assert event_loop_thread.run(complete(scheduler, "o-mlp", PROMPTS[0]))[0][0] == references["o-mlp"][0]
