"""Engines behind the scheduler: swapped weights give the merged checkpoint's answers, the base comes back exactly,
and the sampling options behave as OpenAI's do.  Each test runs on vLLM and on the transformers engine."""

from __future__ import annotations

import uuid

import pytest

from service.engines.base import GenerationRequest, SamplingOptions
from tests.service.conftest import MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.slow  # a live server or engine per module (tests/conftest.py: the tiers)


def request(prompt: str, **sampling) -> GenerationRequest:
    options = SamplingOptions(**{"max_tokens": MAX_TOKENS, "temperature": 0.0, **sampling})
    return GenerationRequest(uuid.uuid4().hex, prompt, options)


async def complete(scheduler, model: str, prompt: str, **sampling) -> dict[int, tuple[str, str | None]]:
    """choice index -> (text, finish_reason), from the streamed deltas."""
    texts, finish = {}, {}
    async for chunk in scheduler.generate(model, request(prompt, **sampling)):
        texts[chunk.index] = texts.get(chunk.index, "") + chunk.text
        finish[chunk.index] = chunk.finish_reason or finish.get(chunk.index)
    return {i: (texts[i], finish[i]) for i in texts}


def answers(loop, scheduler, model: str) -> list[str]:
    async def run():
        return [(await complete(scheduler, model, prompt))[0][0] for prompt in PROMPTS]

    return loop.run(run())


@pytest.mark.parametrize("model", ["qv", "qkvo", "o-mlp"])
def test_swapped_weights_answer_like_the_merged_checkpoint(event_loop_thread, scheduler, references, model):
    assert answers(event_loop_thread, scheduler, model) == references[model]


def test_adapters_change_the_answers(references):
    base = [answers for name, answers in references.items() if name not in ("qv", "qkvo", "o-mlp")][0]
    assert all(references[name] != base for name in ("qv", "qkvo", "o-mlp"))


def test_swapping_back_restores_the_base_exactly(event_loop_thread, scheduler, references):
    base = scheduler.base_name
    for model in ("qkvo", base, "qv", "o-mlp", base):  # q/k/v/o changed, then only some: the rest must be the base's
        assert answers(event_loop_thread, scheduler, model) == references[model]


def test_stop_string_ends_the_text_before_it(event_loop_thread, scheduler, references):
    base = scheduler.base_name
    full = references[base][0]
    stop = full.strip()[:3]
    ((text, finish),) = event_loop_thread.run(complete(scheduler, base, PROMPTS[0], stop=(stop,))).values()
    assert (text, finish) == (full[: full.index(stop)], "stop")


def test_max_tokens_ends_with_length(event_loop_thread, scheduler):
    ((text, finish),) = event_loop_thread.run(
        complete(scheduler, scheduler.base_name, PROMPTS[1], max_tokens=3)
    ).values()
    assert finish == "length" and text


def test_n_choices_with_a_seed_are_reproducible(event_loop_thread, scheduler):
    sampled = {"n": 3, "temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 6}
    first = event_loop_thread.run(complete(scheduler, "qv", PROMPTS[2], **sampled))
    again = event_loop_thread.run(complete(scheduler, "qv", PROMPTS[2], **sampled))
    assert sorted(first) == [0, 1, 2] and all(finish for _, finish in first.values())
    assert first == again


def test_bad_sampling_options_name_the_field():
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0)
