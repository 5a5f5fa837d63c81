"""The OpenAI API of a live `d2lora serve` (vLLM engine), through the official `openai` client."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.service.conftest import ADAPTERS, MAX_TOKENS, PROMPTS
from tests.support.live import API_KEY

CHAT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def client(live_server, uploaded) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY, timeout=300, max_retries=0)


def greedy(client: openai.OpenAI, model: str, prompt: str, **extra) -> openai.types.Completion:
    return client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, **extra)


def test_models_lists_the_base_and_every_ready_adapter(client, live_server):
    ids = [model.id for model in client.models.list()]
    assert ids[0] == live_server.base_name
    assert sorted(ids[1:]) == sorted(ADAPTERS)


@pytest.mark.parametrize("model", ["base", *ADAPTERS])
def test_greedy_completion_equals_transformers_on_the_merged_checkpoint(client, live_server, references, model):
    name = live_server.base_name if model == "base" else model
    answers = [greedy(client, name, prompt).choices[0].text for prompt in PROMPTS]
    assert answers == references[name]


def test_adapters_answer_differently_from_the_base(references, live_server):
    base = references[live_server.base_name]
    assert all(references[name] != base for name in ADAPTERS)


@pytest.mark.parametrize("model", list(ADAPTERS))
def test_completion_stream_equals_non_stream(client, model):
    whole = greedy(client, model, PROMPTS[0])
    chunks = list(greedy(client, model, PROMPTS[0], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == MAX_TOKENS
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


@pytest.mark.parametrize("model", list(ADAPTERS))
def test_chat_stream_equals_non_stream(client, model):
    whole = client.chat.completions.create(model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0)
    stream = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens == MAX_TOKENS
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_chat_uses_the_bases_chat_template(client, live_server):
    chat = client.chat.completions.create(
        model=live_server.base_name, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0
    )
    plain = greedy(client, live_server.base_name, CHAT[0]["content"])
    assert chat.usage.prompt_tokens > plain.usage.prompt_tokens  # the template's role markers


def test_n_choices_with_a_seed_are_reproducible(client):
    ask = {"model": "qv", "prompt": PROMPTS[2], "max_tokens": MAX_TOKENS, "temperature": 1.0, "top_p": 0.9}
    ask |= {"n": 2, "seed": 7}
    first, second = client.completions.create(**ask), client.completions.create(**ask)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.usage.completion_tokens == 2 * MAX_TOKENS


def test_stop_sequence_ends_the_text(client, references):
    reference = references["qkvo"][0]
    stop = reference.strip().split()[1]
    answer = greedy(client, "qkvo", PROMPTS[0], stop=[stop]).choices[0]
    assert answer.finish_reason == "stop" and stop not in answer.text
    assert reference.startswith(answer.text)


def test_unknown_model_is_404_in_the_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as err:
        greedy(client, "no-such-adapter", "hi")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "qv"}, "prompt"),
        ({"model": "qv", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"model": "qv", "prompt": "hi", "temperature": -1}, "temperature"),
        ({"model": "qv", "prompt": ["a", "b"]}, "prompt"),
    ],
)
def test_invalid_requests_are_422_in_the_openai_shape(live_server, uploaded, body, param):
    response = httpx.post(
        f"{live_server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["param"] == param
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "method, path, status", [("GET", "/v1/nothing", 404), ("DELETE", "/v1/models", 405), ("PUT", "/health", 405)]
)
def test_unknown_routes_and_methods_use_the_openai_shape(live_server, method, path, status):
    response = httpx.request(method, f"{live_server.url}{path}")
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def running_requests(live_server) -> float:
    text = httpx.get(f"{live_server.url}/metrics").text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("d2lora_requests_running")))


def eventually(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


def test_a_client_that_disconnects_mid_stream_frees_its_slot(client, live_server):
    stream = client.completions.create(model="o-mlp", prompt=PROMPTS[1], max_tokens=1500, temperature=0, stream=True)
    next(iter(stream))
    stream.close()  # decoding 1500 tokens takes far longer than the wait below
    assert eventually(lambda: running_requests(live_server) == 0)
    assert greedy(client, "o-mlp", PROMPTS[1]).choices[0].finish_reason == "length"


def test_health_and_ready(live_server):
    assert httpx.get(f"{live_server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{live_server.url}/ready").status_code == 200
