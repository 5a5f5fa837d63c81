"""Batched and merged modes on the session's vLLM scheduler (auto policy), and the changes between them.

Every answer must equal transformers' greedy answer on the merger's merged checkpoint of its model
(SPEC §6), whichever mode served it: mixed traffic runs batched (several adapters in one forward),
one adapter alone for `merged_after_s` gets its merged weights, and a rival brings batched mode back.
What the test reads besides the answers is what an operator reads: the Prometheus counters.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from service import metrics
from tests.service.conftest import PROMPTS
from tests.service.test_engines import complete

pytestmark = pytest.mark.vllm


def forwards(mode: str) -> float:
    return metrics.FORWARDS.labels(mode=mode)._value.get()


def forwards_with_several_adapters() -> float:
    """Forward steps that carried two or more adapters (the histogram's count above its `1` bucket)."""
    buckets = {
        s.labels["le"]: s.value for s in metrics.ADAPTERS_PER_FORWARD.collect()[0].samples if s.name.endswith("_bucket")
    }
    return buckets["+Inf"] - buckets["1.0"]


def swaps() -> float:
    return sum(s.value for s in metrics.SWAP_SECONDS.collect()[0].samples if s.name.endswith("_count"))


async def answers(scheduler, jobs: list[tuple[str, int]]) -> list[str]:
    done = await asyncio.gather(*(complete(scheduler, model, PROMPTS[i]) for model, i in jobs))
    return [choices[0][0] for choices in done]


def test_mixed_traffic_shares_forwards_and_every_answer_is_its_models(event_loop_thread, vllm_scheduler, references):
    models = [vllm_scheduler.base_name, "qv", "qkvo", "o-mlp"]
    jobs = [(model, i) for i, model in itertools.product(range(len(PROMPTS)), models)] * 2
    batched, mixed = forwards("batched"), forwards_with_several_adapters()
    got = event_loop_thread.run(answers(vllm_scheduler, jobs))
    assert got == [references[model][i] for model, i in jobs]
    assert forwards("batched") > batched and forwards_with_several_adapters() > mixed


def test_one_adapter_alone_gets_merged_weights_and_a_rival_brings_batching_back(
    event_loop_thread, vllm_scheduler, references
):
    scheduler = vllm_scheduler

    async def run():
        await answers(scheduler, [("qkvo", 0), ("qv", 0)])  # batched: two adapters
        await answers(scheduler, [("qkvo", 1)])  # qkvo's streak begins
        await asyncio.sleep(scheduler.settings.merged_after_s)  # only qkvo asked for merged_after_s
        merged_before, swaps_before = forwards("merged"), swaps()
        alone = await answers(scheduler, [("qkvo", i) for i in range(len(PROMPTS))])
        merged_after, swaps_after = forwards("merged"), swaps()
        batched_before = forwards("batched")
        mixed = await answers(scheduler, [("o-mlp", 1), ("qkvo", 2), (scheduler.base_name, 0)])
        return (
            alone,
            mixed,
            merged_after - merged_before,
            swaps_after - swaps_before,
            forwards("batched") - batched_before,
        )

    alone, mixed, merged_steps, swapped, batched_steps = event_loop_thread.run(run())
    assert alone == references["qkvo"]
    assert mixed == [references["o-mlp"][1], references["qkvo"][2], references[scheduler.base_name][0]]
    assert merged_steps > 0 and swapped >= 1  # qkvo ran on its fused weights
    assert batched_steps > 0  # and the rivals on the base with per-request adapters
