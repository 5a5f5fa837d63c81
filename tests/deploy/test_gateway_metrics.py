"""The vLLM-named metrics an inference gateway routes by (SPEC §5): they parse, and they move with the traffic.

A live `d2lora serve` (tiny Llama) holds one model's merged weights at a time and runs one
sequence at a time, so concurrent requests for two adapters keep one running and the rest
waiting; /metrics is read while they are in flight and after.  On the transformers engine the
KV-cache gauge stays 0 (it has no paged cache); on vLLM it is vLLM's own scheduler figure.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import live
from tests.support.adapters import write_random_adapter
from tests.support.replicas import send

pytestmark = pytest.mark.slow

ADAPTERS = ("gw-a", "gw-b")
SERVER = {"max_model_len": "256", "kv_cache_gib": "1", "max_num_seqs": "1", "max_resident": "1",
          "scheduler_mode": "merged", "time_slice_s": "0.2"}  # fmt: skip
GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


def read(url: str) -> dict:
    """The four gateway series as {name: value}, lora_requests_info as {"info": (labels, value)}."""
    seen = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in GAUGES:
                seen[sample.name] = sample.value
            elif sample.name == "vllm:lora_requests_info":
                assert "info" not in seen, "only the current adapter sets are exported"
                seen["info"] = (sample.labels, sample.value)
    return seen


def upload(url: str, base, name: str, seed: int, work) -> None:
    folder = write_random_adapter(work / name, base, seed=seed)
    files = {
        "config": (folder / "adapter_config.json").read_bytes(),
        "weights": (folder / "adapter_model.safetensors").read_bytes(),
    }
    headers = {"Authorization": f"Bearer {live.ADMIN_TOKEN}"}
    response = httpx.post(f"{url}/adapters", data={"name": name}, files=files, headers=headers, timeout=300)
    assert response.status_code == 201, response.text


@pytest.fixture(scope="module", params=["transformers", pytest.param("vllm", marks=pytest.mark.vllm)])
def readings(request, tiny_base, tmp_path_factory) -> dict:
    """Readings of /metrics before, during (polled) and after 8 concurrent requests over two adapters."""
    engine, base = request.param, tiny_base("llama")
    work = tmp_path_factory.mktemp(f"gateway-{engine}")
    with live.serve(base, work / "data", engine=engine, **SERVER) as url:
        for seed, name in enumerate(ADAPTERS, 1):
            upload(url, base, name, seed, work)
        before, during, done = read(url), [], threading.Event()

        def poll() -> None:
            while not done.is_set():
                during.append(read(url))
                time.sleep(0.02)

        poller = threading.Thread(target=poll)
        poller.start()
        answers = send(url, [(ADAPTERS[i % 2], "The capital of France is") for i in range(8)], 8, max_tokens=48)
        done.set()
        poller.join()
        yield {"engine": engine, "before": before, "during": during, "after": read(url), "answers": answers}


def test_every_gateway_series_is_exported_and_parses(readings):
    for reading in (readings["before"], readings["after"], *readings["during"]):
        assert set(GAUGES) | {"info"} <= set(reading)
        labels, _ = reading["info"]
        assert set(labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
        assert int(labels["max_lora"]) >= 1


def test_running_and_waiting_move_with_the_traffic(readings):
    assert all(a.status == 200 for a in readings["answers"])
    assert readings["before"]["vllm:num_requests_running"] == readings["before"]["vllm:num_requests_waiting"] == 0
    assert max(r["vllm:num_requests_running"] for r in readings["during"]) >= 1
    assert max(r["vllm:num_requests_waiting"] for r in readings["during"]) >= 1
    assert readings["after"]["vllm:num_requests_running"] == readings["after"]["vllm:num_requests_waiting"] == 0


def test_lora_info_names_the_running_and_the_waiting_adapters(readings):
    infos = [r["info"][0] for r in readings["during"]]
    running = {name for labels in infos for name in labels["running_lora_adapters"].split(",") if name}
    waiting = {name for labels in infos for name in labels["waiting_lora_adapters"].split(",") if name}
    assert running == set(ADAPTERS) and waiting == set(ADAPTERS)
    assert any(labels["running_lora_adapters"] and labels["waiting_lora_adapters"] for labels in infos)


def test_lora_info_after_the_traffic_shows_the_resident_merged_model_and_the_time(readings):
    labels, value = readings["after"]["info"]
    assert labels["running_lora_adapters"] in ADAPTERS, "a resident merged model counts as running"
    assert labels["waiting_lora_adapters"] == ""
    assert abs(value - time.time()) < 60


def test_kv_cache_usage_is_vllms_own_figure_and_zero_without_a_paged_cache(readings):
    usage = [r["vllm:kv_cache_usage_perc"] for r in readings["during"]]
    assert all(0 <= u <= 1 for u in usage)
    if readings["engine"] == "vllm":
        assert max(usage) > 0
    else:
        assert max(usage) == 0
