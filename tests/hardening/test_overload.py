"""Overload: beyond the bounded queue, requests get 429 + Retry-After at once; disconnects free their slots."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.hardening.conftest import MAX_NUM_SEQS, MAX_WAITING, PROMPTS
from tests.support.live import INFERENCE_HEADERS

pytestmark = pytest.mark.slow  # a live server or engine per module (tests/conftest.py: the tiers)

BURST = 20


def burst(server, model: str, count: int) -> list[tuple[int, dict, float]]:
    """`count` requests released together: (status, headers, seconds until the answer) each."""
    gate = threading.Barrier(count)

    def one(_) -> tuple[int, dict, float]:
        gate.wait()
        start = time.perf_counter()
        response = server.complete(model, PROMPTS[0], 64)
        return response.status_code, dict(response.headers), time.perf_counter() - start

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_excess_requests_get_429_with_retry_after_before_any_admitted_one_finishes(main_server):
    results = burst(main_server, "qkvo", BURST)
    served = [seconds for status, _, seconds in results if status == 200]
    refused = [(headers, seconds) for status, headers, seconds in results if status == 429]
    assert len(served) + len(refused) == BURST
    assert len(served) >= MAX_NUM_SEQS + MAX_WAITING and len(refused) >= 1
    assert all(int(headers["retry-after"]) >= 1 for headers, _ in refused)
    assert max(seconds for _, seconds in refused) < min(served)


def test_the_service_recovers_by_itself_after_an_overload(main_server, tiny_references):
    burst(main_server, "qv", BURST)
    assert main_server.wait_idle() == (0, 0)
    assert [main_server.answer("qv", p, 8) for p in PROMPTS] == tiny_references["qv"]


def test_clients_that_disconnect_mid_stream_free_their_slots(main_server, tiny_references):
    body = {"model": "o", "prompt": PROMPTS[1], "max_tokens": 200, "temperature": 1.0, "stream": True}
    with httpx.Client(timeout=60, headers=INFERENCE_HEADERS) as client:
        for _ in range(3 * MAX_NUM_SEQS):
            with client.stream("POST", f"{main_server.url}/v1/completions", json=body) as response:
                assert response.status_code == 200
                next(response.iter_lines())
    assert main_server.wait_idle() == (0, 0)
    assert [main_server.answer("o", p, 8) for p in PROMPTS] == tiny_references["o"]
