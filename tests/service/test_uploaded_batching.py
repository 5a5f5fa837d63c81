"""Adapters uploaded through POST /adapters are served batched: the upload keeps a per-request form, and
mixed traffic over them shares forward steps on the live server, every answer its own model's."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from merger.per_request import read_row_scales
from tests.service.conftest import MAX_TOKENS, PROMPTS
from tests.support.live import INFERENCE_HEADERS


def test_an_upload_keeps_its_per_request_form_and_its_artifact(uploaded):
    for name, record in uploaded.items():
        form, artifact = Path(record["form_dir"]), Path(record["artifact_dir"])
        assert (form / "adapter_config.json").is_file() and (form / "adapter_model.safetensors").is_file(), name
        assert read_row_scales(form), f"{name}: a D²-LoRA form has row scales"
        kept = sorted(p.name for p in artifact.iterdir())
        assert kept == (["archive"] if name == "qkvo" else ["adapter_config.json", "adapter_model.safetensors"])


def batching_counters(server) -> tuple[float, float]:
    """(batched forward steps, forward steps that carried two or more adapters) from the server's /metrics."""
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    batched = sum(s.value for s in families["d2lora_forwards"].samples if s.labels.get("mode") == "batched")
    buckets = {s.labels["le"]: s.value for s in families["d2lora_adapters_per_forward"].samples if "le" in s.labels}
    return batched, buckets["+Inf"] - buckets["1.0"]


def complete(server, model: str, prompt: str) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers=INFERENCE_HEADERS, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_mixed_traffic_over_uploaded_adapters_shares_forwards(live_server, uploaded, references):
    jobs = list(itertools.product(range(len(PROMPTS)), [live_server.base_name, *uploaded])) * 2
    before = batching_counters(live_server)
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: complete(live_server, job[1], PROMPTS[job[0]]), jobs))
    assert got == [references[model][i] for i, model in jobs]
    after = batching_counters(live_server)
    assert after[0] > before[0] and after[1] > before[1], (before, after)
