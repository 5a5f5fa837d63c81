"""The OpenAI surface on the session's live `d2lora serve` (vLLM, the demo model, random adapters): echo logprobs
against transformers on the merger's merged checkpoint, token-id prompts, vLLM's sampling options, and
structured outputs through vLLM's backend with the official `openai` SDK.

Echo and structured outputs use an adapter of a realistic size (FINE_TUNED, uploaded for this module): the
session's random adapters (every ΔW 20% of W0) make the model emit near-random text, on which fp32 kernel
noise between vLLM and transformers reaches 2e-4 over 24 tokens, and a JSON grammar that allows whitespace
lets them emit nothing but whitespace.
"""

from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from merger.merge import merge
from tests.service.conftest import PROMPTS
from tests.support.adapters import write_random_adapter
from tests.support.live import API_KEY, INFERENCE_HEADERS
from tests.support.references import hf_prompt_logprobs
from tests.support.uploading import upload_files

REPEATING = "1, 1, 1, 1, 1, 1, 1, 1,"
FINE_TUNED = "fine-qkvo"
PICK = [{"role": "user", "content": "Pick one colour: red, green or blue. Answer in JSON."}]


class Colour(BaseModel):
    colour: Literal["red", "green", "blue"]


@pytest.fixture(scope="module")
def client(live_server, uploaded) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY, timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def fine_tuned(live_server, demo_dir, tmp_path_factory):
    """The merged checkpoint of a D²-LoRA adapter whose every ‖ΔW‖ is 5% of ‖W0‖, served as FINE_TUNED while
    this module runs (removed after, so the session's other tests see only theirs)."""
    root = tmp_path_factory.mktemp("fine-tuned")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    artifact = write_random_adapter(root / "adapter", demo_dir, seed=4, relative_size=0.05, targets=targets)
    response = upload_files(live_server, FINE_TUNED, artifact)
    assert response.status_code == 201, response.text
    yield merge(demo_dir, artifact, root / "merged", progress=False).out_dir
    httpx.delete(f"{live_server.url}/adapters/{FINE_TUNED}", headers=live_server.admin_headers(), timeout=60)


def tokenize(live_server, text: str) -> list[int]:
    response = httpx.post(f"{live_server.url}/tokenize", json={"prompt": text}, headers=INFERENCE_HEADERS)
    return response.json()["tokens"]


def greedy(client: openai.OpenAI, model: str, prompt, max_tokens: int = 6, **extra) -> openai.types.Completion:
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **extra)


@pytest.mark.parametrize("model", ["base", FINE_TUNED])
def test_echo_logprobs_sum_to_transformers_teacher_forced_log_likelihood(
    client, live_server, demo_dir, fine_tuned, model
):
    """What lm-eval's log-likelihood scoring reads: max_tokens 0, echo, logprobs; fp32 within 1e-4."""
    name, checkpoint = (live_server.base_name, demo_dir) if model == "base" else (model, fine_tuned)
    answer = greedy(client, name, list(PROMPTS), max_tokens=0, echo=True, logprobs=1)
    tokens = [tokenize(live_server, prompt) for prompt in PROMPTS]
    references = hf_prompt_logprobs(checkpoint, tokens)
    for choice, prompt, reference in zip(answer.choices, PROMPTS, references, strict=True):
        served = choice.logprobs.token_logprobs
        assert choice.text == prompt and served[0] is None and len(served) == len(reference) + 1
        assert sum(served[1:]) == pytest.approx(sum(reference), abs=1e-4)
        assert served[1:] == pytest.approx(reference, abs=1e-4)
    assert answer.usage.completion_tokens == 0


def test_prompt_logprobs_extension_matches_echo(client, live_server):
    tokens = tokenize(live_server, PROMPTS[0])
    echoed = greedy(client, "qv", tokens, max_tokens=2, echo=True, logprobs=2, extra_body={"prompt_logprobs": 2})
    choice = echoed.choices[0]
    extension = choice.model_extra["prompt_logprobs"]
    assert extension[0] is None and len(extension) == len(tokens)
    own = [entries[str(token)]["logprob"] for token, entries in zip(tokens[1:], extension[1:], strict=True)]
    assert own == choice.logprobs.token_logprobs[1 : len(tokens)]
    assert choice.text.startswith(PROMPTS[0]) and len(choice.logprobs.tokens) == len(tokens) + 2


def test_token_id_prompts_and_several_prompts(client, live_server, references):
    tokens = [tokenize(live_server, prompt) for prompt in PROMPTS]
    by_ids = client.completions.create(model="qkvo", prompt=tokens, max_tokens=8, temperature=0)
    by_text = client.completions.create(model="qkvo", prompt=list(PROMPTS), max_tokens=8, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices] == references["qkvo"]
    assert [c.index for c in by_ids.choices] == [0, 1, 2]
    one = client.completions.create(model="qkvo", prompt=tokens[1], max_tokens=8, temperature=0)
    assert one.choices[0].text == references["qkvo"][1]


def test_chat_logprobs(client):
    answer = client.chat.completions.create(
        model="qv",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    ).choices[0]
    content = answer.logprobs.content
    assert "".join(t.token for t in content).startswith(answer.message.content) and len(content) >= 1
    for token in content:
        assert token.top_logprobs[0].token == token.token and token.top_logprobs[0].logprob == token.logprob
        assert len(token.top_logprobs) == 2 and token.top_logprobs[1].logprob <= token.logprob


# vLLM's sampling options, each against what it must do


def test_top_k_1_and_min_p_1_sample_the_greedy_answer(client, references):
    for option in ({"top_k": 1}, {"min_p": 1.0}):
        sampled = client.completions.create(
            model="qv", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=3, extra_body=option
        )
        assert sampled.choices[0].text == references["qv"][0], option


def detokenize(live_server, tokens: list[int]) -> str:
    response = httpx.post(f"{live_server.url}/detokenize", json={"tokens": tokens}, headers=INFERENCE_HEADERS)
    return response.json()["prompt"]


def test_logit_bias_forces_a_token_and_stop_token_ids_stop_on_it(client, live_server):
    token = tokenize(live_server, " the")[0]
    forced = greedy(client, "o-mlp", PROMPTS[0], max_tokens=3, logit_bias={str(token): 100})
    assert forced.choices[0].text == detokenize(live_server, [token] * 3)
    stopped = greedy(
        client, "o-mlp", PROMPTS[0], max_tokens=3, logit_bias={str(token): 100}, extra_body={"stop_token_ids": [token]}
    )
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1


def test_min_tokens_and_ignore_eos_hold_back_the_end_of_sequence(client, live_server):
    eos = tokenize(live_server, "<|im_end|>")[0]
    forced_end = {"logit_bias": {str(eos): 100}}
    assert greedy(client, "qv", PROMPTS[1], **forced_end).usage.completion_tokens == 1
    held = greedy(client, "qv", PROMPTS[1], **forced_end, extra_body={"min_tokens": 4})
    assert held.usage.completion_tokens == 5 and held.choices[0].finish_reason == "stop"
    ignored = greedy(client, "qv", PROMPTS[1], **forced_end, extra_body={"ignore_eos": True})
    assert ignored.usage.completion_tokens == 6 and ignored.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "option", [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"extra_body": {"repetition_penalty": 2.0}}]
)
def test_penalties_stop_a_repetition(client, option):
    plain = greedy(client, "qv", REPEATING, max_tokens=8).choices[0].text
    penalised = greedy(client, "qv", REPEATING, max_tokens=8, **option).choices[0].text
    assert plain.count("1") > penalised.count("1")
    assert penalised == greedy(client, "qv", REPEATING, max_tokens=8, **option).choices[0].text


def test_best_of_returns_the_choice_with_the_highest_logprob_per_token(client):
    ask = {"model": "qkvo", "prompt": PROMPTS[2], "max_tokens": 6, "temperature": 1.0, "seed": 5}
    every = client.completions.create(**ask, n=4, logprobs=0).choices
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every]
    best = client.completions.create(**ask, n=2, best_of=4).choices
    ranked = sorted(range(4), key=lambda i: -means[i])
    assert [c.text for c in best] == [every[i].text for i in ranked[:2]] and [c.index for c in best] == [0, 1]


# structured outputs (vLLM's structured-outputs backend: xgrammar, guidance as its fallback)


@pytest.mark.parametrize("model", ["base", FINE_TUNED])
def test_parse_returns_an_instance_of_the_pydantic_model(client, live_server, fine_tuned, model):
    name = live_server.base_name if model == "base" else model
    answer = client.chat.completions.parse(
        model=name, messages=PICK, response_format=Colour, max_tokens=48, temperature=0
    ).choices[0]
    assert answer.finish_reason == "stop" and isinstance(answer.message.parsed, Colour)


def test_streamed_json_mode_parses(client, fine_tuned):
    stream = client.chat.completions.create(
        model=FINE_TUNED,
        messages=[{"role": "user", "content": "Describe a cat as a JSON object with a name and an age."}],
        response_format={"type": "json_object"},
        max_tokens=96,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop" and len(chunks) > 3
    assert isinstance(json.loads(text), dict)


def test_completions_take_a_json_schema_as_vllm_does(client, fine_tuned):
    schema = {"type": "json_schema", "json_schema": {"name": "colour", "schema": Colour.model_json_schema()}}
    answer = client.completions.create(
        model=FINE_TUNED,
        prompt="A colour as JSON:",
        max_tokens=48,
        temperature=0,
        extra_body={"response_format": schema},
    ).choices[0]
    assert isinstance(Colour.model_validate_json(answer.text), Colour)
