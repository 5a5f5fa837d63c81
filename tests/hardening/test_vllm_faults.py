"""Faults that are vLLM's own: kill -9 while the engine swaps weights, and an engine-core process that dies.

One vLLM server on the tiny model (its engine core runs in a child process).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from tests.hardening.conftest import PROMPTS
from tests.support.uploading import swapping, upload_files

pytestmark = pytest.mark.slow  # a live server or engine per module (tests/conftest.py: the tiers)

EXIT_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def vllm_server(tiny_dir, tiny_artifacts, tmp_path_factory):
    from tests.support.live import LiveServer

    server = LiveServer(
        tiny_dir,
        tmp_path_factory.mktemp("vllm-data"),
        tmp_path_factory.mktemp("vllm-logs"),
        engine="vllm",
        D2LORA_KV_CACHE_GIB="1",
        D2LORA_TIME_SLICE_S="0.05",
    )
    server.start()
    for name in ("qv", "o"):
        assert upload_files(server, name, tiny_artifacts[name]).status_code == 201
    yield server
    server.kill()


def test_kill9_during_swaps_then_every_adapter_serves_its_references(vllm_server, tiny_references):
    stop = threading.Event()
    traffic = threading.Thread(target=swapping, args=(vllm_server, ("qv", "o"), PROMPTS[0], stop))
    traffic.start()
    time.sleep(2.0)
    vllm_server.kill()
    stop.set()
    traffic.join(30)
    vllm_server.start()
    for name in (vllm_server.base_name, "qv", "o"):
        assert [complete_text(vllm_server.answer(name, p, 8)) for p in PROMPTS] == [
            complete_text(text) for text in tiny_references[name]
        ], name


def complete_text(text: str) -> str:
    """vLLM holds back a trailing incomplete UTF-8 sequence that transformers decodes as U+FFFD (the tiny
    model's tokens are random bytes); the tokens are the same."""
    return text.rstrip("\ufffd")


def engine_core_pids(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(child) for child in out.split()]


def test_an_engine_that_dies_makes_the_server_exit_non_zero(vllm_server):
    children = engine_core_pids(vllm_server.process.pid)
    assert children, "the vLLM engine core runs in a child process"
    for child in children:
        os.kill(child, signal.SIGKILL)
    assert vllm_server.process.wait(EXIT_TIMEOUT_S) == 3
    assert "the engine died" in vllm_server.log_tail(200)
