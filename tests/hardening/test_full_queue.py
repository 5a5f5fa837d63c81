"""A queue held full: excess requests are refused with 429 + Retry-After before any work on their body.

The queue is held full deterministically: the vLLM engine-core process is
stopped (SIGSTOP), so the admitted requests cannot finish and the waiting
ones cannot be admitted, while the server process itself answers as usual.
Under a full queue a request is refused after its API key is checked and
before its body is validated, its model looked up or its chat rendered, so a
body that would get 422 (or a model that would get 404) gets 429 instead; once
the queue drains, the same requests get their own answers again.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import httpx
import psutil
import pytest

from tests.hardening.conftest import PROMPTS
from tests.support.live import INFERENCE_HEADERS

pytestmark = pytest.mark.slow  # a live server or engine per module (tests/conftest.py: the tiers)

MAX_NUM_SEQS, MAX_WAITING = 2, 2
HOLDERS = MAX_NUM_SEQS + MAX_WAITING
CHAT = [{"role": "user", "content": PROMPTS[0]}]


@pytest.fixture(scope="module")
def vllm_server(tiny_dir, tmp_path_factory):
    from tests.support.live import LiveServer

    server = LiveServer(
        tiny_dir,
        tmp_path_factory.mktemp("full-data"),
        tmp_path_factory.mktemp("full-logs"),
        engine="vllm",
        D2LORA_KV_CACHE_GIB="1",
        D2LORA_MAX_NUM_SEQS=str(MAX_NUM_SEQS),
        D2LORA_MAX_WAITING=str(MAX_WAITING),
    )
    server.start()
    yield server
    server.kill()


@contextlib.contextmanager
def queue_held_full(server):
    """Stop the engine core and fill every running and waiting place; on exit let it go: the holders get 200."""
    assert server.wait_idle() == (0, 0), "the previous test's requests still hold places"
    core = psutil.Process(server.process.pid).children()
    statuses: list[int] = []
    holders = [threading.Thread(target=hold, args=(server, statuses)) for _ in range(HOLDERS)]
    for process in core:
        process.send_signal(signal.SIGSTOP)
    try:
        for holder in holders:
            holder.start()
        assert wait_for_counts(server, (MAX_NUM_SEQS, MAX_WAITING)), "the queue never filled"
        yield
    finally:
        for process in core:
            process.send_signal(signal.SIGCONT)
        for holder in holders:
            holder.join(120)
    assert statuses == [200] * HOLDERS


def hold(server, statuses: list[int]) -> None:
    statuses.append(server.complete(server.base_name, PROMPTS[0], 4).status_code)


def wait_for_counts(server, counts: tuple[float, float], timeout_s: float = 30) -> bool:
    """Whether (running, waiting) reached `counts` within the time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (server.gauge("d2lora_requests_running"), server.gauge("d2lora_requests_waiting")) == counts:
            return True
        time.sleep(0.1)
    return False


def post(server, path: str, body: dict, headers: dict = INFERENCE_HEADERS) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=30)


def completion(server, **fields) -> dict:
    return {"model": server.base_name, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, **fields}


def chat(server, **fields) -> dict:
    return {"model": server.base_name, "messages": CHAT, "max_tokens": 4, "temperature": 0, **fields}


def assert_queue_full(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("stream", [False, True])
def test_a_full_queue_refuses_completions_and_chats_with_429_and_retry_after(vllm_server, stream):
    with queue_held_full(vllm_server):
        assert_queue_full(post(vllm_server, "/v1/completions", completion(vllm_server, stream=stream)))
        assert_queue_full(post(vllm_server, "/v1/chat/completions", chat(vllm_server, stream=stream)))
    assert vllm_server.wait_idle() == (0, 0)
    assert post(vllm_server, "/v1/chat/completions", chat(vllm_server)).status_code == 200


def test_a_full_queue_refuses_before_the_body_is_validated_or_the_model_looked_up(vllm_server):
    invalid = [
        ("/v1/completions", completion(vllm_server, max_tokens=-1), 422),
        ("/v1/chat/completions", chat(vllm_server, messages=[{"role": "robot", "content": "hi"}]), 422),
        ("/v1/chat/completions", chat(vllm_server, model="no-such-adapter"), 404),
    ]
    with queue_held_full(vllm_server):
        for path, body, _ in invalid:
            assert_queue_full(post(vllm_server, path, body))
    assert vllm_server.wait_idle() == (0, 0)
    assert [post(vllm_server, path, body).status_code for path, body, _ in invalid] == [s for _, _, s in invalid]


def test_a_full_queue_still_checks_the_api_key_first(vllm_server):
    with queue_held_full(vllm_server):
        response = post(vllm_server, "/v1/chat/completions", chat(vllm_server), {"Authorization": "Bearer wrong"})
    assert response.status_code == 401
