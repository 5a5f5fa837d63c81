"""Load, overload, disconnects, faults and bad inputs against a live `d2lora serve` (issue 6), with figures.

Loopback only, bounded in count and time, stops by itself.  On the demo model
(SmolLM2-135M-Instruct) with three random D²-LoRA adapters on different target sets:

1. load: `--concurrency` clients for `--duration` s (at most `--max-requests`), each request a random mix of
   adapter (or the base), streaming or not, short or long prompt, greedy; every answer is compared with its
   adapter's reference (transformers' greedy completion on the merger's merged checkpoint: SPEC §6);
   server RSS (with its engine process) after warm-up and at the end;
2. overload: a burst of 4x (max_num_seqs + max_waiting) simultaneous requests: how many got 429, how fast,
   with Retry-After, and how long until the service answered correctly again by itself;
3. disconnects: streams dropped after their first chunk; running/waiting must return to 0;
4. faults: kill -9 during a merge, an upload and swaps, then restart: registry consistent, no temp file,
   references again; with vLLM, the engine-core process killed: the server must exit non-zero;
5. bad inputs: seeded hostile bodies, names and archives: how many were tried, and that none got a 5xx.

    python -m benchmarks.load_test [--engine vllm|transformers] [--duration 180] [--concurrency 8]

Prints the table and writes benchmarks/results/hardening.md.
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

from merger.demo import build_demo_model
from merger.merge import merge
from service.settings import Settings
from tests.adapters import write_random_adapter
from tests.hardening.hostile import BAD_NAMES, hostile_archives
from tests.hardening.server import INFERENCE_HEADERS, Server
from tests.hardening.test_kill9 import swapping, trickled_upload
from tests.service.conftest import hf_greedy
from tests.service.uploading import adapter_records, post_adapter, upload_files

RESULTS = Path(__file__).parent / "results" / "hardening.md"
ADAPTERS = {"qv": (["q_proj", "v_proj"], 1), "qkvo": (["q_proj", "k_proj", "v_proj", "o_proj"], 2),
            "o": (["o_proj"], 3)}
LONG = ("The lighthouse keeper climbed the spiral stairs every evening, counting the steps, listening to the sea "
        "against the rocks below, and thinking about the ships that passed in the night. ") * 6
PROMPTS = ("The capital of France is", "def fibonacci(n):", LONG + "What did the keeper count?")
MAX_TOKENS = 16
MAX_NUM_SEQS, MAX_WAITING = 8, 16
UPLOAD_CAP = 8 << 20


def build_adapters(base: Path, root: Path) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """(name -> artifact folder, model -> reference answers to PROMPTS)."""
    artifacts, references = {}, {base.resolve().name: hf_greedy(base, PROMPTS, MAX_TOKENS)}
    for name, (targets, seed) in ADAPTERS.items():
        artifacts[name] = write_random_adapter(root / name, base, seed=seed, relative_size=0.05, targets=targets)
        merge(base, artifacts[name], root / f"{name}-merged", progress=False)
        references[name] = hf_greedy(root / f"{name}-merged", PROMPTS, MAX_TOKENS)
    return artifacts, references


def server_rss_mib(server: Server) -> float:
    """The server and its children (vLLM's engine core), resident."""
    process = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / (1 << 20)


def streamed_text(server: Server, body: dict) -> tuple[int, str]:
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True},
                      headers=INFERENCE_HEADERS, timeout=300) as response:
        if response.status_code != 200:
            return response.status_code, ""
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return 200, "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])


def one_request(server: Server, model: str, prompt_index: int, stream: bool) -> tuple[int, str]:
    body = {"model": model, "prompt": PROMPTS[prompt_index], "max_tokens": MAX_TOKENS, "temperature": 0}
    if stream:
        return streamed_text(server, body)
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers=INFERENCE_HEADERS, timeout=300)
    return response.status_code, response.json()["choices"][0]["text"] if response.status_code == 200 else ""


def load_phase(server: Server, references: dict, args) -> dict:
    models = sorted(references)
    deadline, budget, lock = time.monotonic() + args.duration, [args.max_requests], threading.Lock()
    rows: list[tuple[int, float, bool]] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            with lock:
                if budget[0] == 0:
                    return
                budget[0] -= 1
            model, index, stream = rng.choice(models), rng.randrange(len(PROMPTS)), rng.random() < 0.5
            start = time.perf_counter()
            status, text = one_request(server, model, index, stream)
            rows.append((status, time.perf_counter() - start, status == 200 and text != references[model][index]))

    warm_up(server, references)
    rss_start, start = server_rss_mib(server), time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(client, range(args.concurrency)))
    latencies = sorted(seconds for status, seconds, _ in rows if status == 200)
    return {"requests": len(rows), "concurrency": args.concurrency, "seconds": time.monotonic() - start,
            "statuses": dict(Counter(status for status, _, _ in rows)), "mismatches": sum(m for _, _, m in rows),
            "p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
            "rss_start": rss_start, "rss_end": server_rss_mib(server)}


def warm_up(server: Server, references: dict) -> None:
    for model in references:
        for index in range(len(PROMPTS)):
            assert one_request(server, model, index, False)[1] == references[model][index], model


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values[0] if values else 0.0)


def overload_phase(server: Server, references: dict) -> dict:
    count = 4 * (MAX_NUM_SEQS + MAX_WAITING)
    gate = threading.Barrier(count)

    def one(_) -> tuple[int, float, str | None]:
        gate.wait()
        start = time.perf_counter()
        response = server.complete("qkvo", PROMPTS[2], MAX_TOKENS, timeout=300)
        return response.status_code, time.perf_counter() - start, response.headers.get("retry-after")

    with ThreadPoolExecutor(count) as pool:
        results = list(pool.map(one, range(count)))
    start = time.perf_counter()
    idle = server.wait_idle(60)
    correct = [server.answer("qkvo", p, MAX_TOKENS) for p in PROMPTS] == references["qkvo"]
    refused = sorted(seconds for status, seconds, _ in results if status == 429)
    served = sorted(seconds for status, seconds, _ in results if status == 200)
    return {"burst": count, "statuses": dict(Counter(status for status, _, _ in results)),
            "refused_p50": percentile(refused, 50), "refused_max": max(refused, default=0.0),
            "served_min": min(served, default=0.0), "served_max": max(served, default=0.0),
            "retry_after": all(r for status, _, r in results if status == 429),
            "recovered_s": time.perf_counter() - start, "recovered": idle == (0, 0) and correct}


def disconnect_phase(server: Server) -> dict:
    body = {"model": "o", "prompt": PROMPTS[2], "max_tokens": 512, "temperature": 1.0, "stream": True}
    dropped = 2 * MAX_NUM_SEQS
    with httpx.Client(headers=INFERENCE_HEADERS, timeout=300) as client:
        for _ in range(dropped):
            with client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
                next(response.iter_lines())
    start = time.perf_counter()
    running, waiting = server.wait_idle(60)
    return {"dropped": dropped, "running_after": running, "waiting_after": waiting,
            "freed_s": time.perf_counter() - start}


def kill9_phase(server: Server, artifacts: dict, references: dict) -> dict:
    """kill -9 while a merge runs, an upload trickles in and requests swap adapters; then restart and check."""
    stop = threading.Event()
    workers = [threading.Thread(target=swapping, args=(server, stop)),
               threading.Thread(target=trickled_upload, args=(server, "trickle", b"{}", stop))]
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
    answers = {m: [server.answer(m, p, MAX_TOKENS) for p in PROMPTS] for m in [server.base_name, *ADAPTERS]}
    return {"merge cut": accepted and records["cut"]["status"] == "failed",
            "upload cut": "trickle" not in records,
            "no temp files": all(not list(p.iterdir()) for p in (server.data_dir / "tmp").iterdir() if p.is_dir()),
            "references after restart": answers == references, "restart_s": time.perf_counter() - start}


def engine_death_phase(server: Server) -> dict:
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


def bad_input_phase(server: Server, artifacts: dict, scratch: Path, count: int) -> dict:
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
    return {"tried": sum(statuses.values()), "statuses": dict(statuses),
            "5xx": sum(n for s, n in statuses.items() if s >= 500)}


def report(args, load: dict, overload: dict, drops: dict, kill9: dict, death: dict | None, bad: dict) -> str:
    command = (f"python -m benchmarks.load_test --engine {args.engine} --duration {args.duration} "
               f"--concurrency {args.concurrency} --max-requests {args.max_requests} --bad-bodies {args.bad_bodies}")
    survived = [name for name, ok in kill9.items() if ok is True]
    lines = [
        "# Hardening: load, faults and hostile input", "",
        f"`{command}` — {args.engine} engine, demo model SmolLM2-135M-Instruct fp32, 3 random D²-LoRA adapters "
        f"(q/v, q/k/v/o, o), max_num_seqs {MAX_NUM_SEQS}, max_waiting {MAX_WAITING}, 2-core CPU shared with "
        "other work (latencies are noisy; compare within a run).", "",
        "| load | |", "|---|---|",
        f"| requests / concurrency / duration | {load['requests']} / {load['concurrency']} / {load['seconds']:.0f} s |",
        f"| status counts | {load['statuses']} |",
        f"| answers ≠ reference (SPEC §6) | {load['mismatches']} |",
        f"| latency p50 / p95 | {load['p50']:.2f} s / {load['p95']:.2f} s |",
        f"| server RSS after warm-up → end | {load['rss_start']:.0f} MiB → {load['rss_end']:.0f} MiB |", "",
        "| overload | |", "|---|---|",
        f"| burst / status counts | {overload['burst']} / {overload['statuses']} |",
        f"| 429 answered in p50 / max | {overload['refused_p50'] * 1000:.0f} ms / {overload['refused_max'] * 1000:.0f} ms"
        f" (served requests took {overload['served_min']:.2f}–{overload['served_max']:.2f} s) |",
        f"| every 429 has Retry-After | {overload['retry_after']} |",
        f"| recovered by itself (idle + correct answers) | {overload['recovered']} in {overload['recovered_s']:.1f} s |",
        "", "| faults | |", "|---|---|",
        f"| streams dropped mid-way → running / waiting after | {drops['dropped']} → {drops['running_after']:.0f} / "
        f"{drops['waiting_after']:.0f} (in {drops['freed_s']:.1f} s) |",
        f"| kill -9 during merge + upload + swaps, survived | {', '.join(survived)} "
        f"({len(survived)}/4; restart {kill9['restart_s']:.0f} s) |",
        f"| engine-core process killed | {engine_death_line(death)} |", "",
        "| hostile input | |", "|---|---|",
        f"| bad bodies, names, archives, tokens tried | {bad['tried']} |",
        f"| status counts | {bad['statuses']} |", f"| 5xx | {bad['5xx']} |", ""]
    return "\n".join(lines)


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
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    base = build_demo_model(Settings().cache_dir)
    with tempfile.TemporaryDirectory(prefix="d2lora-load-") as scratch:
        scratch = Path(scratch)
        artifacts, references = build_adapters(base, scratch / "adapters")
        server = Server(base, scratch / "data", scratch, engine=args.engine, D2LORA_MAX_NUM_SEQS=str(MAX_NUM_SEQS),
                        D2LORA_MAX_WAITING=str(MAX_WAITING), D2LORA_TIME_SLICE_S="0.5", D2LORA_HOST="127.0.0.1",
                        D2LORA_MAX_UPLOAD_BYTES=str(UPLOAD_CAP))
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
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
