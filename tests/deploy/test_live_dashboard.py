"""Every dashboard query returns data from a real Prometheus that scraped a live server and HAProxy under traffic.

A tiny Llama is served by `d2lora serve` (the transformers engine: it starts in
seconds, and every metric is recorded above the engine) behind HAProxy running
docker/haproxy.cfg, and every request goes through HAProxy; two adapters are uploaded
(merges, equivalence gauges), and waves of completions and chat requests hit
the base and the adapters (swaps, tokens, latencies), one naming an unknown model
(a 404: the error panels).  Prometheus scrapes between the waves, so rates are
real rates.  Then each panel's PromQL, with Grafana's variables substituted, is
sent to Prometheus' query API, which must answer with at least one series.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import httpx
import pytest

from tests.deploy import live
from tests.deploy.promql import to_promql
from tests.deploy.stack import HEALTHCHECK_SCRIPT, REPO, dashboard_panels, load_dashboard
from tests.support.adapters import write_random_adapter
from tests.support.live import ADMIN_TOKEN, serve
from tests.support.replicas import haproxy
from tests.support.tools import require_tool

pytestmark = [
    pytest.mark.slow,
    pytest.mark.prometheus,
]  # a live server or engine per module (tests/conftest.py: the tiers)

ADAPTERS = ("live-a", "live-b")
PROMPT = "The capital of France is"
TINY_SERVER = {"max_model_len": "256", "kv_cache_gib": "1", "max_num_seqs": "8"}  # tests/tiny.py: 256 positions


def _queries() -> list[tuple[str, str]]:
    dashboard = load_dashboard()
    panels = [(p["title"], t["expr"]) for p in dashboard_panels(dashboard) for t in p.get("targets", [])]
    return panels + [(f"variable ${v['name']}", v["query"]["query"]) for v in dashboard["templating"]["list"]]


QUERIES = _queries()


def upload(client: httpx.Client, base_dir, name: str, seed: int, work_dir) -> None:
    folder = write_random_adapter(work_dir / name, base_dir, seed=seed)
    files = {
        "config": (folder / "adapter_config.json").read_bytes(),
        "weights": (folder / "adapter_model.safetensors").read_bytes(),
    }
    response = client.post(
        "/adapters",
        data={"name": name},
        files=files,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=300,
    )
    assert response.status_code == 201, response.text


def traffic_wave(client: httpx.Client, models: list[str]) -> None:
    for model in models:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        assert client.post("/v1/completions", json=body).status_code == 200
        with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as stream:
            assert stream.status_code == 200 and "[DONE]" in stream.read().decode()
        chat = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
    assert client.post("/v1/completions", json={"model": "no-such-model", "prompt": PROMPT}).status_code == 404


def scrape_targets(server_url: str, proxy) -> dict[str, str]:
    return {"d2lora": server_url.removeprefix("http://"), "haproxy": proxy.metrics_url.split("/")[2]}


@pytest.fixture(scope="module")
def stack(tiny_base, tmp_path_factory):
    """(server URL, Prometheus URL) after the traffic has been scraped."""
    binary, haproxy_binary = require_tool("prometheus"), require_tool("haproxy")
    work = tmp_path_factory.mktemp("live-dashboard")
    base_dir = tiny_base("llama")
    with (
        serve(base_dir, work / "data", engine="transformers", **TINY_SERVER) as server_url,
        haproxy(haproxy_binary, [server_url.removeprefix("http://")], work) as (proxy, _),
        live.prometheus(binary, scrape_targets(server_url, proxy), work) as prom_url,
        httpx.Client(base_url=proxy.url, timeout=120) as client,
    ):
        base_name = client.get("/v1/models").json()["data"][0]["id"]
        upload(client, base_dir, ADAPTERS[0], seed=1, work_dir=work)
        live.wait_for_scrapes(prom_url, "d2lora")
        traffic_wave(client, [base_name, *ADAPTERS[:1]])
        upload(client, base_dir, ADAPTERS[1], seed=2, work_dir=work)
        live.wait_for_scrapes(prom_url, "d2lora")
        traffic_wave(client, [*ADAPTERS, base_name])
        live.wait_for_scrapes(prom_url, "d2lora")
        traffic_wave(client, [ADAPTERS[1]])  # so its counters grow between two scrapes too
        live.wait_for_scrapes(prom_url, "d2lora")
        yield server_url, prom_url


@pytest.fixture(scope="module")
def prometheus_url(stack) -> str:
    return stack[1]


def query(prometheus_url: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": to_promql(expr)}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.mark.parametrize("title, expr", QUERIES, ids=[f"{t}: {e[:40]}" for t, e in QUERIES])
def test_dashboard_query_returns_data(prometheus_url, title, expr):
    assert query(prometheus_url, expr), f"panel {title!r}: no series for {to_promql(expr)}"


def test_completion_rate_shows_every_model_that_was_called(prometheus_url):
    (expr,) = [expr for title, expr in QUERIES if title == "Completions / s by model"]
    rates = {s["metric"].get("model", ""): float(s["value"][1]) for s in query(prometheus_url, expr)}
    assert all(rates.get(name, 0) > 0 for name in ADAPTERS), rates
    assert rates.get("", 0) > 0, "the request naming an unknown model is counted without a model"


def test_container_healthcheck_passes_once_the_server_is_ready(stack):
    port = stack[0].rsplit(":", 1)[1]
    done = subprocess.run(
        [sys.executable, str(HEALTHCHECK_SCRIPT)],
        env=os.environ | {"D2LORA_PORT": port},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


def test_equivalence_gauge_is_finite_for_each_adapter(prometheus_url):
    series = query(prometheus_url, "max by (model) (d2lora_equivalence_max_abs_logit_diff)")
    values = {s["metric"]["model"]: float(s["value"][1]) for s in series}
    assert set(ADAPTERS) <= set(values) and all(math.isfinite(v) for v in values.values()), values
