"""/metrics of a live server, scraped by a real Prometheus whose query API must return the series."""

from __future__ import annotations

import subprocess
import time

import httpx
import openai
import pytest

from tests.service.conftest import LIVE_MERGED_AFTER_S, MAX_TOKENS, PROMPTS
from tests.support.live import API_KEY, free_port
from tests.support.tools import require_tool

SCRAPE_CONFIG = """\
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: d2lora
    static_configs:
      - targets: ["{target}"]
"""
QUERY_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def traffic(live_server, uploaded) -> None:
    """Batched requests, then qv alone for merged_after_s (a swap to its merged weights), then a rival."""
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY, timeout=300, max_retries=0)
    client.completions.create(model="qv", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    time.sleep(LIVE_MERGED_AFTER_S + 0.5)
    client.completions.create(model="qv", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0)
    list(
        client.chat.completions.create(
            model="o-mlp",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
        )
    )


@pytest.fixture(scope="module")
def prometheus(live_server, traffic, tmp_path_factory):
    """A Prometheus scraping the live server every second; yields its base URL."""
    binary = require_tool("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    (folder / "prometheus.yml").write_text(SCRAPE_CONFIG.format(target=live_server.url.removeprefix("http://")))
    url = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [
            str(binary),
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address={url}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield f"http://{url}"
    process.terminate()
    process.wait(30)


def query(prometheus: str, promql: str) -> list[dict]:
    """The query's result vector, once Prometheus has scraped it (empty list on timeout)."""
    deadline = time.monotonic() + QUERY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            body = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5).json()
            if body.get("status") == "success" and body["data"]["result"]:
                return body["data"]["result"]
        except (httpx.TransportError, ValueError):  # not up yet, or still starting (a body that is not JSON)
            pass
        time.sleep(1)
    return []


def test_metrics_text_has_every_spec_series(live_server, traffic):
    text = httpx.get(f"{live_server.url}/metrics").text
    for name in (
        "d2lora_requests_total",
        "d2lora_request_latency_seconds_bucket",
        "d2lora_time_to_first_token_seconds_bucket",
        "d2lora_time_per_output_token_seconds_bucket",
        "d2lora_prompt_tokens_total",
        "d2lora_generation_tokens_total",
        "d2lora_requests_running",
        "d2lora_requests_waiting",
        "d2lora_swap_seconds_bucket",
        "d2lora_merge_seconds_bucket",
        "d2lora_merges_total",
        "d2lora_equivalence_max_abs_logit_diff",
        "d2lora_resident_models",
    ):
        assert f"\n{name}" in text, name


def test_prometheus_returns_the_request_series(prometheus):
    result = query(prometheus, 'd2lora_requests_total{model="qv",endpoint="/v1/completions",status="200"}')
    assert result and float(result[0]["value"][1]) >= 1


def test_prometheus_returns_the_token_series(prometheus):
    generated = query(prometheus, 'd2lora_generation_tokens_total{model="o-mlp"}')
    prompt = query(prometheus, 'd2lora_prompt_tokens_total{model="qv"}')
    assert generated and float(generated[0]["value"][1]) >= MAX_TOKENS
    assert prompt and float(prompt[0]["value"][1]) > 0


def test_prometheus_returns_the_equivalence_gauge_of_each_adapter(prometheus, uploaded):
    result = query(prometheus, "d2lora_equivalence_max_abs_logit_diff")
    assert {series["metric"]["model"] for series in result} >= set(uploaded)
