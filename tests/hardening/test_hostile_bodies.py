"""Hostile request bodies against the live server: every answer is < 500, in the error shape, traceback-free.

Hypothesis draws bodies of every kind: arbitrary JSON, near-valid requests
with each field fuzzed, raw bytes, nesting deep enough to break a recursive
parser.  Each answer is checked the same way (`assert_sane`).
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hardening.conftest import PROMPTS
from tests.support.live import INFERENCE_HEADERS

pytestmark = pytest.mark.slow  # a live server or engine per module (tests/conftest.py: the tiers)

EXAMPLES = 60
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
anything = st.one_of(json_values, st.integers(min_value=-(2**70), max_value=2**70), st.text(max_size=200))
small_max_tokens = st.one_of(st.integers(max_value=4), anything)
sampling_fields = {
    "max_tokens": small_max_tokens,
    "temperature": anything,
    "top_p": anything,
    "seed": anything,
    "stop": anything,
    "n": st.one_of(st.integers(min_value=-3, max_value=9), anything),
    "stream": anything,
    "stream_options": anything,
    "user": anything,
    "logprobs": anything,
    "max_completion_tokens": small_max_tokens,
}


def near_valid(required: dict) -> st.SearchStrategy[dict]:
    """A valid-looking body with some fields fuzzed (or dropped)."""
    return st.fixed_dictionaries(required, optional=sampling_fields)


model_names = st.one_of(st.sampled_from(["qv", "o", "../../etc/passwd", "", "x" * 300]), st.text(max_size=30))
completion_bodies = near_valid({"model": model_names, "prompt": st.one_of(st.sampled_from(PROMPTS), anything)})
messages = st.one_of(
    st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "tool", "nobody"]),
                "content": st.one_of(st.text(max_size=40), anything),
            }
        ),
        max_size=3,
    ),
    anything,
)
chat_bodies = near_valid({"model": model_names, "messages": messages})


def assert_sane(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


def post(server, path: str, content: bytes, content_type: str = "application/json") -> httpx.Response:
    headers = {**INFERENCE_HEADERS, "Content-Type": content_type}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=120)


@FUZZ
@given(body=completion_bodies)
def test_completion_bodies(main_server, body):
    assert_sane(post(main_server, "/v1/completions", json.dumps(body).encode()))


@FUZZ
@given(body=chat_bodies)
def test_chat_bodies(main_server, body):
    assert_sane(post(main_server, "/v1/chat/completions", json.dumps(body).encode()))


@FUZZ
@given(body=anything, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_arbitrary_json(main_server, body, path):
    assert_sane(post(main_server, path, json.dumps(body).encode()))


@FUZZ
@given(raw=st.binary(max_size=300), content_type=st.sampled_from(["application/json", "text/plain", "", "a/b;c"]))
def test_raw_bytes(main_server, raw, content_type):
    assert_sane(post(main_server, "/v1/completions", raw, content_type))


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deeply_nested_json(main_server, depth):
    assert_sane(post(main_server, "/v1/completions", b"[" * depth + b"]" * depth))
    assert_sane(post(main_server, "/v1/completions", b'{"model":' * depth + b"1" + b"}" * depth))


def test_a_prompt_longer_than_max_model_len_is_a_400(main_server):
    response = main_server.complete("qv", "fox " * 400, 4)
    assert_sane(response)
    assert response.status_code == 400 and "max_model_len" in response.json()["error"]["message"]


def test_a_huge_max_tokens_stops_at_max_model_len(main_server):
    response = main_server.complete("qv", PROMPTS[0], 10**12, temperature=2.0, seed=0)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["total_tokens"] <= 256


def test_an_empty_prompt_is_a_400(main_server):
    response = main_server.complete("qv", "", 4)
    assert_sane(response)
    assert response.status_code == 400
