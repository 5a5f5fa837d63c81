"""Load, overload, disconnects, faults and bad inputs against a live `d2lora serve` (issue 6), with figures.

Loopback only, bounded in count and time, stops by itself.  On the demo model
(SmolLM2-135M-Instruct) with three random D²-LoRA adapters on different target sets:

1. load: `--concurrency` clients (each on one kept-alive connection) for `--duration` s (at most
   `--max-requests`), each request a random mix of adapter (or the base), completion or chat, streaming or not,
   short or long prompt, greedy; every answer is compared with its adapter's reference (benchmarks/load_traffic.py:
   SPEC §6); server RSS (with its engine process) every `--rss-every` s: after `--warm-up` s of load, at the end,
   the peak and the least-squares slope after warm-up (benchmarks/server_figures.py);
2. overload: a burst of 4x (max_num_seqs + max_waiting) simultaneous completions and chats, each client's
   connection open before the burst: how many got 429, how fast (as the client saw it, and the server's own
   d2lora_request_latency_seconds), with Retry-After, and how long until the service answered correctly again;
3. disconnects: streams dropped after their first chunk; running/waiting must return to 0;
4. faults: kill -9 during a merge, an upload and swaps, then restart: registry consistent, no temp file,
   references again; with vLLM, the engine-core process killed: the server must exit non-zero;
5. bad inputs: seeded hostile bodies, names and archives: how many were tried, and that none got a 5xx.

    python -m benchmarks.load_test [--engine vllm|transformers] [--duration 180] [--concurrency 8]
                                   [--warm-up 30] [--rss-every 5] [--results DIR]

Prints the table and writes DIR/hardening.md and DIR/hardening.json (every figure and every RSS sample);
DIR is benchmarks/results unless given.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

from benchmarks.common import machine_load, require_positive
from benchmarks.load_traffic import (
    ENDPOINTS,
    PROMPTS,
    Ask,
    References,
    answer,
    build_adapters,
    client,
    every_ask,
    matches,
    response_text,
)
from benchmarks.server_figures import RssSampler, fastest_bounds, latency_buckets, rss_summary
from merger.demo import build_demo_model
from merger.fs import write_atomic
from service.settings import Settings
from tests.support.hostile import BAD_NAMES, hostile_archives
from tests.support.live import INFERENCE_HEADERS, LiveServer
from tests.support.uploading import adapter_records, post_adapter, swapping, trickled_upload, upload_files

RESULTS = Path(__file__).parent / "results"
MAX_NUM_SEQS, MAX_WAITING = 8, 16
UPLOAD_CAP = 8 << 20
Row = tuple[str, int, float, bool]  # endpoint, status, seconds, answer ≠ reference


def load_phase(server: LiveServer, references: References, args) -> dict:
    warm_up(server, references)
    sampler = RssSampler(server.process.pid, args.rss_every)
    sampler.start()
    start = time.monotonic()
    rows = run_clients(server, references, args)
    figures = load_figures(rows, args.concurrency, time.monotonic() - start)
    return {**figures, **rss_summary(sampler.stop(), args.warm_up)}


def run_clients(server: LiveServer, references: References, args) -> list[Row]:
    """`--concurrency` clients, each on its own connection, until the time or the request budget runs out."""
    deadline, budget, lock, rows = time.monotonic() + args.duration, [args.max_requests], threading.Lock(), []

    def take() -> bool:
        with lock:
            budget[0] -= 1
            return budget[0] >= 0 and time.monotonic() < deadline

    def run(seed: int) -> None:
        rng = random.Random(seed)
        with client() as http:
            while take():
                ask, start = Ask.random(rng, sorted(references)), time.perf_counter()
                status, text = answer(http, server.url, ask)
                wrong = status == 200 and not matches(references, ask, text)
                rows.append((ask.endpoint, status, time.perf_counter() - start, wrong))

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(run, range(args.concurrency)))
    return rows


def load_figures(rows: list[Row], concurrency: int, seconds: float) -> dict:
    latencies = sorted(seconds for _, status, seconds, _ in rows if status == 200)
    return {
        "requests": len(rows),
        "concurrency": concurrency,
        "seconds": seconds,
        "statuses": dict(Counter(status for _, status, _, _ in rows)),
        "mismatches": sum(wrong for *_, wrong in rows),
        "by_endpoint": {endpoint: by_endpoint(rows, endpoint) for endpoint in ENDPOINTS},
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
    }


def by_endpoint(rows: list[Row], endpoint: str) -> dict:
    mine = [row for row in rows if row[0] == endpoint]
    return {"requests": len(mine), "mismatches": sum(wrong for *_, wrong in mine)}


def warm_up(server: LiveServer, references: References) -> None:
    """Every model, endpoint and prompt once; a wrong answer stops the run here."""
    with client() as http:
        for ask in every_ask(references):
            status, text = answer(http, server.url, ask)
            assert status == 200 and matches(references, ask, text), (ask, text, references[ask.model][ask.endpoint])


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values[0] if values else 0.0)


def burst(url: str, asks: list[Ask]) -> list[tuple[int, float, str | None, str]]:
    """All `asks` released together, each on a connection opened before: (status, seconds, Retry-After, text)."""
    gate = threading.Barrier(len(asks))

    def one(ask: Ask) -> tuple[int, float, str | None, str]:
        with client() as http:
            http.get(f"{url}/health")
            gate.wait()
            start = time.perf_counter()
            response = http.post(f"{url}{ENDPOINTS[ask.endpoint]}", json=ask.body())
            seconds = time.perf_counter() - start
        return response.status_code, seconds, response.headers.get("retry-after"), response_text(ask, response)

    with ThreadPoolExecutor(len(asks)) as pool:
        return list(pool.map(one, asks))


def overload_phase(server: LiveServer, references: References) -> dict:
    asks = [Ask("qkvo", list(ENDPOINTS)[i % 2], 2, False) for i in range(4 * (MAX_NUM_SEQS + MAX_WAITING))]
    before = latency_buckets(server.url)
    results = burst(server.url, asks)
    refused = sorted(seconds for status, seconds, _, _ in results if status == 429)
    server_p50, server_max = fastest_bounds(before, latency_buckets(server.url), len(refused))
    served = sorted(seconds for status, seconds, _, _ in results if status == 200)
    return {
        "burst": len(asks),
        "statuses": dict(Counter(status for status, *_ in results)),
        "served_wrong": sum(
            s == 200 and not matches(references, a, t) for a, (s, _, _, t) in zip(asks, results, strict=True)
        ),
        "refused_p50": percentile(refused, 50),
        "refused_max": max(refused, default=0.0),
        "server_refused_p50": server_p50,
        "server_refused_max": server_max,
        "served_min": min(served, default=0.0),
        "served_max": max(served, default=0.0),
        "retry_after": all(r for status, _, r, _ in results if status == 429),
        **recovery(server, references),
    }


def recovery(server: LiveServer, references: References) -> dict:
    """How long until the service is idle again by itself, and whether it then answers correctly."""
    start = time.perf_counter()
    idle = server.wait_idle(60)
    correct = answers_match(server, {"qkvo": references["qkvo"]})
    return {"recovered_s": time.perf_counter() - start, "recovered": idle == (0, 0) and correct}


def answers_match(server: LiveServer, references: References) -> bool:
    """Every model's completions and chats (not streamed) equal their references."""
    with client() as http:
        return all(matches(references, ask, answer(http, server.url, ask)[1]) for ask in every_ask(references))


def disconnect_phase(server: LiveServer) -> dict:
    body = {"model": "o", "prompt": PROMPTS[2], "max_tokens": 512, "temperature": 1.0, "stream": True}
    dropped = 2 * MAX_NUM_SEQS
    with httpx.Client(headers=INFERENCE_HEADERS, timeout=300) as client:
        for _ in range(dropped):
            with client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
                next(response.iter_lines())
    start = time.perf_counter()
    running, waiting = server.wait_idle(60)
    return {
        "dropped": dropped,
        "running_after": running,
        "waiting_after": waiting,
        "freed_s": time.perf_counter() - start,
    }


def kill9_phase(server: LiveServer, artifacts: dict, references: References) -> dict:
    """kill -9 while a merge runs, an upload trickles in and requests swap adapters; then restart and check."""
    stop = threading.Event()
    workers = [
        threading.Thread(target=swapping, args=(server, ("qv", "o"), PROMPTS[0], stop)),
        threading.Thread(target=trickled_upload, args=(server, "trickle", b"{}", stop)),
    ]
    for worker in workers:
        worker.start()
    time.sleep(2.0)
    accepted = upload_files(server, "cut", artifacts["qkvo"], params={"wait": "false"}).status_code == 202
    server.kill()
    stop.set()
    for worker in workers:
        worker.join(60)
    start = time.perf_counter()
    server.start()
    records = adapter_records(server)
    return {
        "merge cut": accepted and records["cut"]["status"] == "failed",
        "upload cut": "trickle" not in records,
        "no temp files": all(not list(p.iterdir()) for p in (server.data_dir / "tmp").iterdir() if p.is_dir()),
        "references after restart": answers_match(server, references),
        "restart_s": time.perf_counter() - start,
    }


def engine_death_phase(server: LiveServer) -> dict:
    """vLLM only: kill the engine-core process; the server must exit non-zero (a supervisor restarts it)."""
    children = psutil.Process(server.process.pid).children()
    start = time.perf_counter()
    for child in children:
        child.kill()
    try:
        code = server.process.wait(120)
    except Exception:
        server.kill()
        code = None
    return {"exit code": code, "exit_s": time.perf_counter() - start}


def bad_bodies(rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    """Seeded hostile request bodies: wrong types, out-of-range values, junk, deep nesting."""
    junk = [None, -1, 0, 2**64, 1e308, "", "x" * 5000, [], {}, [1, [2, [3]]], True, "../../etc/passwd", "\x00"]
    fields = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "seed"]
    bodies = []
    for i in range(count):
        body = {"model": rng.choice(["qv", "o", "nope"]), "prompt": "hi", "max_tokens": 2}
        for field in rng.sample(fields, rng.randint(1, 4)):
            body[field] = rng.choice(junk)
        raw = json.dumps(body).encode() if i % 5 else rng.choice([b"[" * 50_000, rng.randbytes(200), b"{", b""])
        bodies.append((rng.choice(["/v1/completions", "/v1/chat/completions"]), raw))
    return bodies


def bad_input_phase(server: LiveServer, artifacts: dict, scratch: Path, count: int) -> dict:
    statuses = Counter()
    headers = {**INFERENCE_HEADERS, "Content-Type": "application/json"}
    for path, raw in bad_bodies(random.Random(0), count):
        statuses[httpx.post(f"{server.url}{path}", content=raw, headers=headers, timeout=120).status_code] += 1
    for name in BAD_NAMES:
        statuses[upload_files(server, name, artifacts["o"]).status_code] += 1
    for archive in hostile_archives(artifacts["qv"], scratch / "hostile").values():
        with open(archive, "rb") as f:
            statuses[post_adapter(server, {"name": "hostile"}, {"archive": f}).status_code] += 1
    for authorization in ("Bearer", "Bearer wrong", "Basic abc", "Bearer " + "x" * 10_000):
        statuses[httpx.get(f"{server.url}/adapters", headers={"Authorization": authorization}).status_code] += 1
    return {
        "tried": sum(statuses.values()),
        "statuses": dict(statuses),
        "5xx": sum(n for s, n in statuses.items() if s >= 500),
    }


def report(args, load: dict, overload: dict, drops: dict, kill9: dict, death: dict | None, bad: dict) -> str:
    lines = [
        "# Hardening: load, faults and hostile input",
        "",
        f"`{command(args)}` — {args.engine} engine, demo model SmolLM2-135M-Instruct fp32, 3 random D²-LoRA "
        f"adapters (q/v, q/k/v/o, o), max_num_seqs {MAX_NUM_SEQS}, max_waiting {MAX_WAITING}, 2-core CPU shared "
        f"with other work (latencies are noisy; compare within a run; {args.machine_load} at start). "
        "Every figure and every RSS sample is in hardening.json beside this page.",
        "",
    ]
    lines += load_rows(load) + [""] + overload_rows(overload) + [""] + fault_rows(drops, kill9, death) + [""]
    lines += [
        "| hostile input | |",
        "|---|---|",
        f"| bad bodies, names, archives, tokens tried | {bad['tried']} |",
        f"| status counts | {bad['statuses']} |",
        f"| 5xx | {bad['5xx']} |",
        "",
    ]
    return "\n".join(lines)


def command(args) -> str:
    return (
        f"python -m benchmarks.load_test --engine {args.engine} --duration {args.duration:g} "
        f"--concurrency {args.concurrency} --max-requests {args.max_requests} --bad-bodies {args.bad_bodies} "
        f"--warm-up {args.warm_up:g} --rss-every {args.rss_every:g}"
    )


def load_rows(load: dict) -> list[str]:
    per_endpoint = ", ".join(f"{e} {n['mismatches']} of {n['requests']}" for e, n in load["by_endpoint"].items())
    return [
        "| load | |",
        "|---|---|",
        f"| requests / concurrency / duration | {load['requests']} / {load['concurrency']} / {load['seconds']:.0f} s |",
        f"| status counts | {load['statuses']} |",
        f"| answers ≠ reference (SPEC §6) | {load['mismatches']} ({per_endpoint}; streamed or not) |",
        f"| latency p50 / p95 | {load['p50']:.2f} s / {load['p95']:.2f} s |",
        f"| server RSS after warm-up → end | {load['rss_after_warm_up']:.0f} MiB → {load['rss_end']:.0f} MiB |",
        f"| server RSS peak / slope after warm-up | {load['rss_peak']:.0f} MiB / {slope_text(load)} |",
    ]


def slope_text(load: dict) -> str:
    slope, alone = load["rss_slope_mib_per_min"], load["server_alone_slope_mib_per_min"]
    if slope is None:
        return "n/a (under two samples after warm-up)"
    return (
        f"{slope:+.1f} MiB/min over {load['rss_samples_after_warm_up']} samples "
        f"(server process alone {alone:+.1f}, the rest its engine core)"
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def overload_rows(o: dict) -> list[str]:
    return [
        "| overload | |",
        "|---|---|",
        f"| burst (completions + chats) / status counts | {o['burst']} / {o['statuses']} |",
        f"| served answers ≠ reference | {o['served_wrong']} |",
        f"| 429 answered in p50 / max (client; connections opened before the burst) | {ms(o['refused_p50'])} / "
        f"{ms(o['refused_max'])} (served requests took {o['served_min']:.2f}–{o['served_max']:.2f} s) |",
        f"| 429 answered in p50 / max, server side (d2lora_request_latency_seconds buckets) | "
        f"≤ {ms(o['server_refused_p50'])} / ≤ {ms(o['server_refused_max'])} |",
        f"| every 429 has Retry-After | {o['retry_after']} |",
        f"| recovered by itself (idle + correct answers) | {o['recovered']} in {o['recovered_s']:.1f} s |",
    ]


def fault_rows(drops: dict, kill9: dict, death: dict | None) -> list[str]:
    survived = [name for name, ok in kill9.items() if ok is True]
    return [
        "| faults | |",
        "|---|---|",
        f"| streams dropped mid-way → running / waiting after | {drops['dropped']} → "
        f"{drops['running_after']:.0f} / {drops['waiting_after']:.0f} (in {drops['freed_s']:.1f} s) |",
        f"| kill -9 during merge + upload + swaps, survived | {', '.join(survived)} "
        f"({len(survived)}/4; restart {kill9['restart_s']:.0f} s) |",
        f"| engine-core process killed | {engine_death_line(death)} |",
    ]


def engine_death_line(death: dict | None) -> str:
    if death is None:
        return "n/a (the transformers engine runs in the server process)"
    return f"server exited with code {death['exit code']} after {death['exit_s']:.1f} s"


def shown(phase: str, figures: dict) -> dict:
    """Print a phase's figures as soon as it ends (a later phase that fails does not lose them)."""
    print(f"{phase}: {figures}", flush=True)
    return figures


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    parser.add_argument("--duration", type=float, default=180, help="seconds of mixed load (upper bound)")
    parser.add_argument("--max-requests", type=int, default=5000, help="requests of mixed load (upper bound)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--bad-bodies", type=int, default=300)
    parser.add_argument("--warm-up", type=float, default=30, help="seconds of load before RSS counts as warmed up")
    parser.add_argument("--rss-every", type=float, default=5, help="seconds between server RSS samples")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for hardening.md and hardening.json")
    args = parser.parse_args()
    require_positive(parser, args, ("concurrency", "max_requests"))
    if min(args.duration, args.rss_every) <= 0 or args.warm_up < 0:
        parser.error("--duration and --rss-every must be above 0, --warm-up at least 0")
    args.machine_load = machine_load()
    return args


def main() -> None:
    args = parse_args()
    base = build_demo_model(Settings().cache_dir)
    with tempfile.TemporaryDirectory(prefix="d2lora-load-") as scratch:
        scratch = Path(scratch)
        artifacts, references = build_adapters(base, scratch / "adapters")
        server = LiveServer(
            base,
            scratch / "data",
            scratch,
            engine=args.engine,
            D2LORA_MAX_NUM_SEQS=str(MAX_NUM_SEQS),
            D2LORA_MAX_WAITING=str(MAX_WAITING),
            D2LORA_TIME_SLICE_S="0.5",
            D2LORA_HOST="127.0.0.1",
            D2LORA_MAX_UPLOAD_BYTES=str(UPLOAD_CAP),
        )
        (scratch / "data").mkdir()
        server.start()
        try:
            for name, artifact in artifacts.items():
                assert upload_files(server, name, artifact).status_code == 201
            load = shown("load", load_phase(server, references, args))
            overload = shown("overload", overload_phase(server, references))
            drops = shown("disconnects", disconnect_phase(server))
            bad = shown("bad inputs", bad_input_phase(server, artifacts, scratch, args.bad_bodies))
            kill9 = shown("kill -9", kill9_phase(server, artifacts, references))
            death = shown("engine death", engine_death_phase(server)) if args.engine == "vllm" else None
        finally:
            server.kill()
    text = report(args, load, overload, drops, kill9, death, bad)
    print(text)
    figures = {
        "command": command(args),
        "load": load,
        "overload": overload,
        "disconnects": drops,
        "kill -9": kill9,
        "engine death": death,
        "bad inputs": bad,
    }
    write_atomic(args.results / "hardening.json", json.dumps(figures, indent=1, default=str) + "\n")
    write_atomic(args.results / "hardening.md", text)


if __name__ == "__main__":
    main()
