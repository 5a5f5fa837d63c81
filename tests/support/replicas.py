"""Replicas of `d2lora serve` sharing one data dir behind a real HAProxy running docker/haproxy.cfg.

`haproxy_config` is the shipped config with only what differs on one host changed: loopback
listen ports, the replicas as static servers instead of compose's DNS template, and optionally
another `balance` line (round robin, to compare).  `send` plays a list of requests through a
URL with a fixed number in flight and records, per answer, which replica made it (the
X-D2LoRA-Replica header).  Used by tests/deploy/test_replicas.py and benchmarks/replicas.py.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.replica import REPLICA_HEADER, RESIDENT_HEADER
from tests.support.live import free_ports
from tests.support.processes import REPO, running

HAPROXY_CONFIG = REPO / "docker" / "haproxy.cfg"
_SERVER_TEMPLATE = re.compile(r"^\s*server-template .*$", re.MULTILINE)
_RESOLVERS = re.compile(r"^resolvers .*?(?=^\S|\Z)", re.MULTILINE | re.DOTALL)
_BALANCE = re.compile(r"^(\s*)balance .*$", re.MULTILINE)


def haproxy_config(servers: list[str], port: int, metrics_port: int, balance: str | None = None) -> str:
    """docker/haproxy.cfg for `servers` (host:port) on loopback; `balance` replaces the hash on `model`."""
    text = HAPROXY_CONFIG.read_text()
    text = text.replace("bind :8000", f"bind 127.0.0.1:{port}").replace("bind :8405", f"bind 127.0.0.1:{metrics_port}")
    static = "\n".join(f"    server replica{i} {server}" for i, server in enumerate(servers, 1))
    text = _RESOLVERS.sub("", _SERVER_TEMPLATE.sub(static, text))
    if balance is not None:
        text = _BALANCE.sub(rf"\1balance {balance}", text)
    return text


@dataclass(frozen=True)
class Proxy:
    url: str
    metrics_url: str
    log: Path  # HAProxy's output: its httplog line per request, with the termination state


@contextlib.contextmanager
def haproxy(
    binary: Path, servers: list[str], work_dir: Path, balance: str | None = None, wait_up: bool = True
) -> Iterator[tuple[Proxy, object]]:
    """HAProxy in the foreground in front of `servers`; yields (its URLs, its process) once its exporter answers
    (and, with `wait_up`, once its health checks found every server up)."""
    port, metrics_port = free_ports(2)  # distinct: HAProxy would bind both frontends to one port
    name = f"haproxy-{balance or 'model-hash'}".replace(" ", "-")
    config = work_dir / f"{name}.cfg"
    config.write_text(haproxy_config(servers, port, metrics_port, balance))
    metrics_url, log = f"http://127.0.0.1:{metrics_port}/metrics", work_dir / f"{name}.log"
    with running([str(binary), "-db", "-f", str(config)], metrics_url, log) as process:
        proxy = Proxy(f"http://127.0.0.1:{port}", metrics_url, log)
        if wait_up:
            wait_for_servers_up(proxy, len(servers))
        yield proxy, process


def wait_for_servers_up(proxy: Proxy, count: int, timeout_s: float = 30) -> None:
    """Until HAProxy's health checks on /ready have marked `count` servers up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if servers_up(proxy) >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"HAProxy saw fewer than {count} servers up within {timeout_s} s")


def servers_up(proxy: Proxy) -> int:
    families = text_string_to_metric_families(httpx.get(proxy.metrics_url, timeout=5).text)
    return sum(
        1
        for family in families
        if family.name == "haproxy_server_status"
        for sample in family.samples
        if sample.labels.get("state") == "UP" and sample.value == 1
    )


def swaps(replica_url: str) -> int:
    """How many hot-swaps a replica has made (its d2lora_swap_seconds count, over all models)."""
    families = text_string_to_metric_families(httpx.get(f"{replica_url}/metrics", timeout=5).text)
    return int(
        sum(
            sample.value
            for family in families
            if family.name == "d2lora_swap_seconds"
            for sample in family.samples
            if sample.name == "d2lora_swap_seconds_count"
        )
    )


@dataclass(frozen=True)
class Answer:
    model: str
    prompt: str
    status: int  # 0: no HTTP answer (connection failed or dropped)
    replica: str
    resident: str
    text: str
    tokens: int  # completion tokens
    started: float
    finished: float


def complete(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> Answer:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "model": model}  # model last: see bufsize
    started = time.monotonic()
    try:
        response = client.post("/v1/completions", json=body)
    except httpx.HTTPError as err:
        return Answer(model, prompt, 0, "", "", repr(err), 0, started, time.monotonic())
    ok = response.status_code == 200
    text = response.json()["choices"][0]["text"] if ok else response.text
    tokens = response.json()["usage"]["completion_tokens"] if ok else 0
    headers = response.headers
    return Answer(
        model,
        prompt,
        response.status_code,
        headers.get(REPLICA_HEADER, ""),
        headers.get(RESIDENT_HEADER, ""),
        text,
        tokens,
        started,
        time.monotonic(),
    )


def send(url: str, requests: list[tuple[str, str]], concurrency: int, max_tokens: int) -> list[Answer]:
    """Every (model, prompt) as a greedy completion through `url`, `concurrency` in flight, in order of submission."""
    with httpx.Client(base_url=url, timeout=300) as client, ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(complete, client, model, prompt, max_tokens) for model, prompt in requests]
        return [future.result() for future in futures]
