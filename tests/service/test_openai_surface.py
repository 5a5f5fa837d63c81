"""The OpenAI surface on a live `d2lora serve --engine transformers` (tiny Llama, one adapter): refusals, echo and
logprobs, token-id and several prompts, best_of, /tokenize, with the official `openai` client where it can send it.

The HTTP layer is the same for every engine; what only vLLM does (sampling options, structured outputs) is in
test_openai_vllm.py, and this engine refuses it (tested here).
"""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from merger.merge import merge
from service.protocol.chat import ChatCompletionRequest
from service.protocol.completions import CompletionRequest
from service.protocol.fields import CHAT_FIELDS, COMPLETION_FIELDS
from tests.support.adapters import write_random_adapter
from tests.support.live import API_KEY, INFERENCE_HEADERS, LiveServer
from tests.support.references import hf_prompt_logprobs
from tests.support.uploading import upload_files

pytestmark = pytest.mark.slow  # a live server per module (tests/conftest.py: the tiers)

ADAPTER = "tiny-qkvo"
PROMPT = "The capital of France is Paris. The capital of Italy is"
CHAT = [{"role": "user", "content": "What is two plus two?"}]


@pytest.fixture(scope="module")
def tiny_dir(tiny_base):
    return tiny_base("llama")


@pytest.fixture(scope="module")
def tiny_adapter(tiny_dir, tmp_path_factory):
    """(artifact folder, merged checkpoint) of a random D²-LoRA adapter for the tiny base."""
    root = tmp_path_factory.mktemp("surface-adapter")
    artifact = write_random_adapter(root / "adapter", tiny_dir, seed=5, scale=0.5)
    return artifact, merge(tiny_dir, artifact, root / "merged", progress=False).out_dir


@pytest.fixture(scope="module")
def server(tiny_dir, tiny_adapter, tmp_path_factory):
    live = LiveServer(tiny_dir, tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("logs"), engine="transformers")
    live.start()
    try:
        response = upload_files(live, ADAPTER, tiny_adapter[0])
        assert response.status_code == 201, response.text
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, timeout=120, max_retries=0)


def post(server: LiveServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=INFERENCE_HEADERS, timeout=120)


def completion(server: LiveServer, **body) -> dict:
    response = post(server, "/v1/completions", {"model": ADAPTER, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def assert_refused(response: httpx.Response, param: str, status: int = 400) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and param in error["message"]


# refusals: every OpenAI field this server does not implement, with a value a client would send

REFUSED_VALUES = {
    "suffix": "Rome.",
    "audio": {"voice": "alloy", "format": "wav"},
    "function_call": "auto",
    "functions": [{"name": "lookup", "parameters": {"type": "object"}}],
    "modalities": ["text"],
    "moderation": {"model": "omni-moderation-latest"},
    "parallel_tool_calls": True,
    "prediction": {"type": "content", "content": "Rome"},
    "prompt_cache_options": {"mode": "implicit"},
    "prompt_cache_retention": "24h",
    "reasoning_effort": "low",
    "service_tier": "auto",
    "tool_choice": "auto",
    "tools": [{"type": "function", "function": {"name": "lookup"}}],
    "verbosity": "low",
    "web_search_options": {},
}
COMPLETION_REFUSED = sorted(COMPLETION_FIELDS - set(CompletionRequest.model_fields))
CHAT_REFUSED = sorted(CHAT_FIELDS - set(ChatCompletionRequest.model_fields))


def test_every_refused_field_has_a_value_to_send():
    assert set(COMPLETION_REFUSED) | set(CHAT_REFUSED) == set(REFUSED_VALUES)


@pytest.mark.parametrize("field", COMPLETION_REFUSED)
def test_completion_fields_openai_defines_and_this_server_lacks_are_400(server, field):
    body = {"model": ADAPTER, "prompt": PROMPT, field: REFUSED_VALUES[field]}
    assert_refused(post(server, "/v1/completions", body), field)


@pytest.mark.parametrize("field", CHAT_REFUSED)
def test_chat_fields_openai_defines_and_this_server_lacks_are_400(client, field):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=ADAPTER, messages=CHAT, max_tokens=2, **{field: REFUSED_VALUES[field]})
    assert refused.value.body["param"] == field and refused.value.body["code"] == "unsupported_parameter"


IMAGE = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
UNKNOWN_AND_NESTED = [
    ("/v1/completions", {"prompt": PROMPT, "use_beam_search": True}, "use_beam_search"),  # vLLM's, not ours
    ("/v1/completions", {"prompt": PROMPT, "stream": True, "stream_options": {"every": 1}}, "stream_options.every"),
    ("/v1/chat/completions", {"messages": [{**CHAT[0], "name": "ana"}]}, "messages.0.name"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": IMAGE}]}, "messages.0.content.0"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "text", "x": 1}}, "response_format.x"),
    ("/tokenize", {"prompt": PROMPT, "chat_template": "{{ messages }}"}, "chat_template"),
]


@pytest.mark.parametrize("path, body, param", UNKNOWN_AND_NESTED)
def test_unknown_and_nested_fields_are_400_naming_them(server, path, body, param):
    assert_refused(post(server, path, {"model": ADAPTER, **body}), param)


def test_fields_that_change_nothing_and_nulls_are_accepted(client, server):
    no_effect = {
        "user": "u-1",
        "metadata": {"run": "1"},
        "store": False,
        "safety_identifier": "s",
        "prompt_cache_key": "k",
    }
    chat = client.chat.completions.create(model=ADAPTER, messages=CHAT, max_tokens=2, temperature=0, **no_effect)
    plain = client.chat.completions.create(model=ADAPTER, messages=CHAT, max_tokens=2, temperature=0)
    assert chat.choices[0].message.content == plain.choices[0].message.content
    nulls = completion(server, prompt=PROMPT, max_tokens=2, suffix=None, logprobs=None, best_of=None)
    assert nulls["choices"][0]["text"] == completion(server, prompt=PROMPT, max_tokens=2)["choices"][0]["text"]


ENGINE_FEATURES = {
    "top_k": 5,
    "min_p": 0.1,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "repetition_penalty": 1.2,
    "logit_bias": {"10": 5},
    "stop_token_ids": [10],
    "ignore_eos": True,
    "min_tokens": 2,
    "response_format": {"type": "json_object"},
}


@pytest.mark.parametrize("field", sorted(ENGINE_FEATURES))
def test_what_the_transformers_engine_lacks_is_400_naming_it(server, field):
    body = {"model": ADAPTER, "prompt": PROMPT, "max_tokens": 4, field: ENGINE_FEATURES[field]}
    response = post(server, "/v1/completions", body)
    assert_refused(response, field)
    assert "transformers engine" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "path, body, param, status",
    [
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens", 422),
        ("/v1/completions", {"prompt": PROMPT, "n": 3, "best_of": 2}, "best_of", 422),
        ("/v1/completions", {"prompt": PROMPT, "best_of": 2, "stream": True}, "best_of", 422),
        ("/v1/completions", {"prompt": PROMPT, "logprobs": 21}, "logprobs", 422),
        ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs", 422),
        ("/v1/completions", {"prompt": [1, 2, 10**6]}, "prompt", 400),
        ("/v1/completions", {"prompt": [[1, 2], "mixed"]}, "prompt", 422),
        ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs", 422),
        ("/detokenize", {"tokens": [10**6]}, "tokens", 400),
    ],
)
def test_invalid_values_name_the_field(server, path, body, param, status):
    assert_refused(post(server, path, {"model": ADAPTER, **body}), param, status)


# echo and logprobs


def test_echo_logprobs_are_the_merged_checkpoints_teacher_forced_logprobs(server, tiny_adapter):
    scored = completion(server, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)["choices"][0]
    tokens = post(server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    (reference,) = hf_prompt_logprobs(tiny_adapter[1], [tokens])
    logprobs = scored["logprobs"]
    assert scored["text"] == PROMPT and "".join(logprobs["tokens"]) == PROMPT
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx(reference, abs=1e-4)
    assert sum(logprobs["token_logprobs"][1:]) == pytest.approx(sum(reference), abs=1e-4)
    assert all(PROMPT[o:].startswith(t) for t, o in zip(logprobs["tokens"], logprobs["text_offset"], strict=True))


def test_generated_logprobs_name_the_greedy_token_first(server):
    choice = completion(server, prompt=PROMPT, max_tokens=4, logprobs=3)["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"] and len(logprobs["tokens"]) == 4
    for token, value, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert len(top) in (3, 4) and top[token] == value == max(top.values())  # greedy: the most likely
        assert all(math.isfinite(v) and v <= 0 for v in top.values())


def test_echo_with_generation_and_prompt_logprobs_agree(server):
    echoed = completion(server, prompt=PROMPT, max_tokens=3, echo=True, logprobs=2, prompt_logprobs=2)["choices"][0]
    plain = completion(server, prompt=PROMPT, max_tokens=3, logprobs=2)["choices"][0]
    tokens = post(server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    assert echoed["text"] == PROMPT + plain["text"]
    # the same positions, computed once over the whole prompt (prompt logprobs) and once over the last: float noise
    assert echoed["logprobs"]["token_logprobs"][len(tokens) :] == pytest.approx(
        plain["logprobs"]["token_logprobs"], abs=1e-5
    )
    extension = echoed["prompt_logprobs"]  # vLLM's: per prompt token {token id: {logprob, rank, decoded_token}}
    assert extension[0] is None and len(extension) == len(tokens)
    own = [entries[str(token)] for token, entries in zip(tokens[1:], extension[1:], strict=True)]
    assert [e["logprob"] for e in own] == echoed["logprobs"]["token_logprobs"][1 : len(tokens)]
    assert all(len(entries) in (2, 3) for entries in extension[1:])  # the token there and the 2 most likely


def test_streamed_logprobs_equal_the_whole_answer(client):
    ask = {"model": ADAPTER, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 2, "echo": True}
    whole = client.completions.create(**ask).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**ask, stream=True)]
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.logprobs.tokens] == whole.logprobs.tokens
    assert [o for c in chunks for o in c.logprobs.text_offset] == whole.logprobs.text_offset
    assert [v for c in chunks for v in c.logprobs.token_logprobs] == whole.logprobs.token_logprobs


def test_chat_logprobs_in_openais_chat_shape(client):
    answer = client.chat.completions.create(
        model=ADAPTER, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    ).choices[0]
    content = answer.logprobs.content
    assert len(content) == 4 and "".join(t.token for t in content).startswith(answer.message.content)
    for token in content:
        assert [t.token for t in token.top_logprobs][0] == token.token and len(token.top_logprobs) == 3
        assert bytes(token.bytes).decode() == token.token
    stream = client.chat.completions.create(
        model=ADAPTER, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3, stream=True
    )
    streamed = [t for chunk in stream for t in (chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else [])]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


# prompts


def test_token_id_prompts_answer_as_their_text(client, server):
    tokens = post(server, "/tokenize", {"prompt": PROMPT}).json()["tokens"]
    by_text = client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=1)
    by_ids = client.completions.create(model=ADAPTER, prompt=tokens, max_tokens=4, temperature=0, logprobs=1)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.choices[0].logprobs.token_logprobs == by_text.choices[0].logprobs.token_logprobs
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(tokens)


def test_several_prompts_number_their_choices_prompt_major(client, server):
    prompts = ["The capital of Italy is", "A quick brown fox", "Question: what is two plus two?"]
    ask = {"model": ADAPTER, "max_tokens": 3, "temperature": 0}
    answers = [client.completions.create(prompt=p, **ask) for p in prompts]
    singles = [answer.choices[0].text for answer in answers]
    batch = client.completions.create(prompt=prompts, n=2, **ask)
    assert [c.index for c in batch.choices] == list(range(6))
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [s for s in singles for _ in range(2)]
    tokens = [post(server, "/tokenize", {"prompt": p}).json()["tokens"] for p in prompts]
    by_ids = client.completions.create(prompt=tokens, **ask)
    assert [c.text for c in by_ids.choices] == singles
    assert batch.usage.prompt_tokens == sum(map(len, tokens))  # each prompt once, however many choices
    assert batch.usage.completion_tokens == 2 * sum(answer.usage.completion_tokens for answer in answers)
    streamed = {}
    for chunk in client.completions.create(prompt=prompts, n=2, stream=True, **ask):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {c.index: c.text for c in batch.choices}


def test_best_of_returns_the_choice_with_the_highest_logprob_per_token(client):
    ask = {"model": ADAPTER, "prompt": PROMPT, "max_tokens": 4, "temperature": 1.0, "seed": 11}
    every = client.completions.create(**ask, n=3, logprobs=0).choices
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every]
    best = client.completions.create(**ask, n=1, best_of=3).choices
    assert [c.index for c in best] == [0] and best[0].logprobs is None
    assert best[0].text == every[means.index(max(means))].text
    assert len({c.text for c in every}) > 1  # else this test could not tell


# tokenizer routes and /v1/models


def test_tokenize_and_detokenize_round_trip(client, server):
    tokenized = post(server, "/tokenize", {"prompt": PROMPT, "return_token_strs": True}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) == len(tokenized["token_strs"])
    assert tokenized["max_model_len"] == 256  # the tiny model's own context
    assert post(server, "/detokenize", {"tokens": tokenized["tokens"]}).json() == {"prompt": PROMPT}
    chat = post(server, "/tokenize", {"model": ADAPTER, "messages": CHAT}).json()
    answer = client.chat.completions.create(model=ADAPTER, messages=CHAT, max_tokens=1)
    assert chat["count"] == answer.usage.prompt_tokens
    assert_refused(post(server, "/tokenize", {"model": "nope", "prompt": "x"}), "model", 404)


def test_models_carry_max_model_len(client, server):
    cards = {card.id: card.model_extra["max_model_len"] for card in client.models.list()}
    assert cards == {server.base_name: 256, ADAPTER: 256}
