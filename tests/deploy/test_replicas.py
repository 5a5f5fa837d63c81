"""Two replicas behind HAProxy (docker/haproxy.cfg): each adapter stays on one replica; a dead one is routed around.

Two `d2lora serve` processes share one data dir, each with the transformers engine on the tiny
Llama of tests/tiny.py (it starts in seconds) and room for 4 resident models; 8 adapters are
uploaded through one of them.  The same seeded random traffic over the 8 adapters goes through
HAProxy hashing on `model` and through the same config balancing round robin.  Requests are
sent one at a time there, so the bounded load never moves one (its own test sends a burst).
Every answer is compared with transformers' greedy completion on the merger's merged
checkpoint.  Last, one replica is SIGKILLed in the middle of the traffic.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import NamedTuple

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from merger.merge import merge
from tests.support import live
from tests.support import replicas as rp
from tests.support.adapters import write_random_adapter
from tests.support.references import hf_greedy
from tests.support.tools import require_tool
from tests.support.uploading import upload_files

pytestmark = pytest.mark.slow

ADAPTERS = tuple(f"task-{i}" for i in range(8))
PROMPTS = ("The capital of France is", "Question: what is two plus two?", "Convert to upper case: hello")
MAX_TOKENS = 6
REQUESTS = 120
REPLICA_SETTINGS = {"max_model_len": "256", "kv_cache_gib": "1", "max_num_seqs": "8", "max_resident": "4"}


def traffic(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(rng.choice(ADAPTERS), rng.choice(PROMPTS)) for _ in range(count)]


def references(model_dir) -> dict[str, str]:
    """prompt -> transformers' own greedy completion, fp32."""
    return dict(zip(PROMPTS, hf_greedy(model_dir, PROMPTS, MAX_TOKENS), strict=True))


def upload_decisive(server: live.LiveServer, base, work, name: str, seed: int) -> tuple:
    """Upload a random adapter: (its folder, transformers' answers on its merged checkpoint).

    The tiny random Llama has near-tied logits, so now and then an adapter's fp32 greedy path turns on
    the last bit and verification refuses it (rightly: 422, greedy agreement below 1).  Routing is what
    this module tests, so such a seed is replaced by another.
    """
    for attempt in range(4):
        folder = write_random_adapter(work / f"{name}-{attempt}", base, seed=seed + 100 * attempt, scale=0.3)
        response = upload_files(server, name, folder)
        if response.status_code == 201:
            merge(base, folder, work / f"{name}-merged", progress=False)
            return folder, references(work / f"{name}-merged")
        assert response.status_code == 422 and "greedy_agreement" in response.text, response.text
    raise AssertionError(f"{name}: four seeds refused by verification")


class Cluster(NamedTuple):
    urls: list[str]  # the replicas'
    servers: list[live.LiveServer]
    hashed: rp.Proxy  # HAProxy hashing on model
    round_robin: rp.Proxy  # the same config balancing round robin
    adapters: dict[str, tuple]  # name -> (folder, {prompt: transformers' greedy answer on its merged checkpoint})


@pytest.fixture(scope="module")
def cluster(tiny_base, tmp_path_factory) -> Iterator[Cluster]:
    haproxy_binary = require_tool("haproxy")
    work, base = tmp_path_factory.mktemp("replicas"), tiny_base("llama")
    with contextlib.ExitStack() as stack:
        started = [
            stack.enter_context(
                live.serve_process(base, work / "data", work / f"replica{i}", "transformers", **REPLICA_SETTINGS)
            )
            for i in (1, 2)
        ]
        made = {name: upload_decisive(started[0], base, work, name, seed) for seed, name in enumerate(ADAPTERS, 1)}
        urls = [server.url for server in started]
        servers = [url.removeprefix("http://") for url in urls]
        hashed, _ = stack.enter_context(rp.haproxy(haproxy_binary, servers, work))
        round_robin, _ = stack.enter_context(rp.haproxy(haproxy_binary, servers, work, balance="roundrobin"))
        yield Cluster(urls, started, hashed, round_robin, made)


@pytest.fixture(scope="module")
def adapters(cluster: Cluster) -> dict[str, tuple]:
    return cluster.adapters


def played(cluster, proxy: rp.Proxy, requests: list[tuple[str, str]], concurrency: int = 1):
    """(answers, swaps per 100 requests over both replicas)."""
    urls = cluster.urls
    before = sum(rp.swaps(url) for url in urls)
    answers = rp.send(proxy.url, requests, concurrency, MAX_TOKENS)
    return answers, 100 * (sum(rp.swaps(url) for url in urls) - before) / len(requests)


@pytest.fixture(scope="module")
def runs(cluster):
    """The same traffic through HAProxy hashing on `model`, then through round robin."""
    requests = traffic(REQUESTS, seed=0)
    return {
        "hash": played(cluster, cluster.hashed, requests),
        "roundrobin": played(cluster, cluster.round_robin, requests),
    }


def wrong(answers, adapters) -> list:
    return [a for a in answers if a.status != 200 or a.text != adapters[a.model][1][a.prompt]]


def test_every_answer_equals_transformers_on_its_merged_checkpoint(runs, adapters):
    references = {tuple(answers.values()) for _, answers in adapters.values()}
    assert len(references) > len(ADAPTERS) // 2, "the adapters must answer differently to be a test"
    for mode, (answers, _) in runs.items():
        assert not wrong(answers, adapters), mode


def replicas_of(answers) -> dict[str, set[str]]:
    seen = defaultdict(set)
    for answer in answers:
        seen[answer.model].add(answer.replica)
    return dict(seen)


def test_each_adapter_is_served_by_one_replica_and_both_replicas_serve(runs):
    hashed = replicas_of(runs["hash"][0])
    assert all(len(replicas) == 1 for replicas in hashed.values()), hashed
    assert len(set().union(*hashed.values())) == 2
    assert all(len(replicas) == 2 for replicas in replicas_of(runs["roundrobin"][0]).values())


def test_hashing_on_model_swaps_far_less_than_round_robin(runs):
    hashed, round_robin = runs["hash"][1], runs["roundrobin"][1]
    split = replicas_of(runs["hash"][0])
    message = f"swaps per 100 requests: hash {hashed:.1f}, round robin {round_robin:.1f}; replicas: {split}"
    assert hashed <= 0.5 * round_robin, message


def test_the_replica_header_names_the_answering_replica_and_what_it_holds(runs, cluster):
    answers, _ = runs["hash"]
    names = {httpx.get(f"{url}/health").headers[rp.REPLICA_HEADER] for url in cluster.urls}
    assert {a.replica for a in answers} == names
    assert all(a.model in a.resident.split(",") for a in answers)


def test_a_body_longer_than_the_default_buffer_is_still_routed_by_model(runs, cluster):
    answers, _ = runs["hash"]
    home = {a.model: a.replica for a in answers}
    hashed = cluster.hashed
    for model in ADAPTERS[:4]:
        body = {"prompt": PROMPTS[0], "max_tokens": 2, "user": "x" * 100_000, "model": model}  # model after 100 kB
        response = httpx.post(f"{hashed.url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        assert response.headers[rp.REPLICA_HEADER] == home[model]


def test_a_burst_for_one_adapter_overflows_to_the_other_replica(cluster, adapters):
    hashed = cluster.hashed
    answers = rp.send(hashed.url, [(ADAPTERS[0], PROMPTS[0])] * 16, concurrency=8, max_tokens=MAX_TOKENS)
    assert not wrong(answers, adapters)
    assert len({a.replica for a in answers}) == 2, "hash-balance-factor bounds a replica's share of the load"


def completions_served(replica_url: str) -> float:
    families = text_string_to_metric_families(httpx.get(f"{replica_url}/metrics", timeout=5).text)
    return sum(
        sample.value
        for family in families
        if family.name == "d2lora_requests"
        for sample in family.samples
        if sample.name == "d2lora_requests_total" and sample.labels["endpoint"] == "/v1/completions"
    )


def test_a_killed_replica_loses_at_most_its_requests_in_flight(cluster, adapters):
    urls, servers, hashed = cluster.urls, cluster.servers, cluster.hashed
    victim = httpx.get(f"{urls[1]}/health").headers[rp.REPLICA_HEADER]
    requests = traffic(80, seed=1)
    served_before, killed_at = completions_served(urls[1]), []

    def kill_when_busy() -> None:
        """SIGKILL the second replica once it has served 5 of this traffic's requests."""
        deadline = time.monotonic() + 120
        while completions_served(urls[1]) < served_before + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        servers[1].kill()  # lists the children first: the SIGKILL itself lands tens of ms after `started`
        killed_at.append((started, time.monotonic()))

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    answers = rp.send(hashed.url, requests, concurrency=4, max_tokens=MAX_TOKENS)
    killer.join()
    ((kill_started, kill_ended),) = killed_at
    in_flight = [a for a in answers if a.started <= kill_ended and a.finished >= kill_started]
    failed = wrong(answers, adapters)
    assert servers[1].process.returncode == -signal.SIGKILL
    assert set(failed) <= set(in_flight), (failed, killed_at, hashed.log.read_text()[-6000:])
    after = [a for a in answers if a.started > kill_ended]
    assert after and all(a.replica != victim for a in after)
    assert len(after) >= len(requests) // 4, "the kill must come early enough to leave traffic after it"
