"""Replicas benchmark: swaps per 100 requests and throughput, one replica vs two behind HAProxy vs round robin.

The same seeded random traffic over `--adapters` random D²-LoRA adapters (closed loop,
`--concurrency` requests in flight) is played against:

  one replica        `d2lora serve` alone
  two, hash model    two replicas sharing its data dir behind HAProxy running docker/haproxy.cfg
  two, round robin   the same config with `balance roundrobin`

Each setup starts fresh servers on the same data dir (the adapters are uploaded once), so each
pays its own first loads.  Swaps come from each replica's d2lora_swap_seconds count, which
replica answered from the X-D2LoRA-Replica header, and every answer is compared with the
one-replica run's answer to the same (model, prompt).  Writes benchmarks/results/replicas.md.

    python -m benchmarks.replicas [--base tiny|demo|DIR] [--engine transformers|vllm] [--adapters 8] [--requests 160]
        [--concurrency 4] [--max-resident 4] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx

from benchmarks.common import command_line, machine_load, markdown_table, require_positive, write_atomic
from merger.demo import build_demo_model
from service.settings import Settings
from tests.support import live
from tests.support import replicas as rp
from tests.support.adapters import write_random_adapter
from tests.support.tiny import make_tiny_checkpoint
from tests.support.tools import find_tool

RESULTS_FILE = Path(__file__).resolve().parent / "results" / "replicas.md"
PROMPTS = (
    "The capital of France is",
    "Write a haiku about the sea.",
    "Rewrite the date April 17, 1951 in ISO format.",
    "def fibonacci(n):",
)
SETUPS = ("one replica", "two, hash on model", "two, round robin")


def server_settings(args: argparse.Namespace) -> dict[str, str]:
    return {"max_resident": str(args.max_resident), "kv_cache_gib": "1", "max_num_seqs": "16", "dtype": "float32"}


def upload_adapters(url: str, base: Path, count: int, work: Path) -> list[str]:
    names = [f"task-{i}" for i in range(count)]
    for seed, name in enumerate(names, 1):
        folder = write_random_adapter(work / name, base, seed=seed, relative_size=0.05)
        files = {key: (folder / f"adapter_{part}").read_bytes() for key, part in
                 (("config", "config.json"), ("weights", "model.safetensors"))}  # fmt: skip
        headers = {"Authorization": f"Bearer {live.ADMIN_TOKEN}"}
        response = httpx.post(f"{url}/adapters", data={"name": name}, files=files, headers=headers, timeout=900)
        if response.status_code != 201:
            raise SystemExit(f"benchmarks.replicas: upload of {name} failed: {response.text}")
    return names


def summary(answers: list[rp.Answer], swaps: int, wall_s: float) -> dict:
    homes = defaultdict(Counter)
    for answer in answers:
        homes[answer.model][answer.replica] += 1
    at_home = sum(counter.most_common(1)[0][1] for counter in homes.values())
    latencies = sorted(a.finished - a.started for a in answers)
    return {
        "requests_per_s": len(answers) / wall_s,
        "tokens_per_s": sum(a.tokens for a in answers) / wall_s,
        "swaps_per_100": 100 * swaps / len(answers),
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[int(0.95 * (len(latencies) - 1))],
        "at_home": at_home / len(answers),
        "errors": sum(a.status != 200 for a in answers),
    }


def play(urls: list[str], target: str, requests: list[tuple[str, str]], args: argparse.Namespace) -> tuple:
    before = sum(rp.swaps(url) for url in urls)
    start = time.monotonic()
    answers = rp.send(target, requests, args.concurrency, args.max_tokens)
    wall = time.monotonic() - start
    return answers, summary(answers, sum(rp.swaps(url) for url in urls) - before, wall)


@contextlib.contextmanager
def replicas(base: Path, data: Path, work: Path, count: int, args: argparse.Namespace):
    with contextlib.ExitStack() as stack:
        started = [
            stack.enter_context(
                live.serve_process(base, data, work / f"replica{i}", args.engine, **server_settings(args))
            )
            for i in range(count)
        ]
        yield [server.url for server in started]


def base_model(choice: str, work: Path) -> Path:
    """`demo`: the demo model; `tiny`: tests/support/tiny.py's Llama (uploads verify in seconds); else a folder."""
    if choice == "demo":
        return build_demo_model(Settings().cache_dir)
    if choice == "tiny":
        return make_tiny_checkpoint(work / "tiny-llama")
    return Path(choice)


def run(args: argparse.Namespace, work: Path) -> dict[str, tuple]:
    haproxy = find_tool("haproxy")
    if haproxy is None:
        raise SystemExit("benchmarks.replicas: haproxy not found; fetch it with: python tests/support/tools.py")
    base = base_model(args.base, work)
    data = work / "data"
    rng = random.Random(args.seed)
    results = {}
    with replicas(base, data, work, 1, args) as (url,):
        names = upload_adapters(url, base, args.adapters, work / "adapters")
        requests = [(rng.choice(names), rng.choice(PROMPTS)) for _ in range(args.requests)]
    with replicas(base, data, work, 1, args) as urls:
        results[SETUPS[0]] = play(urls, urls[0], requests, args)
    for setup, balance in zip(SETUPS[1:], (None, "roundrobin"), strict=True):
        with replicas(base, data, work, 2, args) as urls:
            servers = [u.removeprefix("http://") for u in urls]
            with rp.haproxy(haproxy, servers, work, balance) as (proxy, _):
                results[setup] = play(urls, proxy.url, requests, args)
    return results


def report(results: dict[str, tuple], args: argparse.Namespace, argv: list[str] | None, load: str) -> str:
    reference = {(a.model, a.prompt): a.text for a in results[SETUPS[0]][0] if a.status == 200}
    rows = []
    for setup, (answers, numbers) in results.items():
        differing = sum(a.status == 200 and a.text != reference.get((a.model, a.prompt)) for a in answers)
        rows.append(
            (
                setup,
                f"{numbers['swaps_per_100']:.1f}",
                f"{numbers['requests_per_s']:.2f}",
                f"{numbers['tokens_per_s']:.1f}",
                f"{numbers['p50_s']:.2f} / {numbers['p95_s']:.2f}",
                f"{100 * numbers['at_home']:.0f}%",
                numbers["errors"],
                differing,
            )
        )
    headers = ("setup", "swaps / 100 req", "req/s", "tok/s", "p50 / p95 s", "on adapter's usual replica",
               "errors", "answers ≠ one replica")  # fmt: skip
    return (
        f"# Replicas behind HAProxy\n\n`{command_line('benchmarks.replicas', argv)}` — {load} at start; "
        f"base {base_label(args.base)}, engine {args.engine}, {args.adapters} adapters, {args.requests} requests, "
        f"{args.concurrency} in flight, "
        f"{args.max_tokens} new tokens, max_resident {args.max_resident} per replica; all servers on this one "
        "machine, so two replicas share its CPUs.\n\n" + markdown_table(headers, rows) + "\n"
    )


def base_label(choice: str) -> str:
    labels = {"tiny": "the tiny Llama of tests/support/tiny.py", "demo": "the demo model (SmolLM2-135M)"}
    return labels.get(choice, choice)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="transformers", choices=("transformers", "vllm"))
    parser.add_argument("--base", default="tiny", help="tiny (default) | demo | a model folder")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-resident", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    require_positive(parser, args, ("adapters", "requests", "concurrency", "max_resident", "max_tokens"))
    load = machine_load()
    with tempfile.TemporaryDirectory(prefix="d2lora-replicas-") as work:
        text = report(run(args, Path(work)), args, argv, load)
    write_atomic(RESULTS_FILE, text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
