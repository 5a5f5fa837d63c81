"""Serving benchmark (issue 4): throughput and latency on one adapter vs traffic spread over three, and swap latency.

Drives the scheduler in-process (no HTTP): the same Scheduler + engine `d2lora serve` runs.  In one run on the
demo model (SmolLM2-135M-Instruct) with three random D²-LoRA adapters on q/k/v/o:

- generated tokens/s and p50/p95 request latency for 1, 4 and 16 concurrent clients, all on one adapter, then
  with each client's requests spread round-robin over the three adapters (so the scheduler must swap);
- swap latency p50/p95 (planner + engine.load_weights, what the scheduler does between drain and admit) beside
  the time to copy the same tensors in memory (into preallocated buffers), and to read them from the page cache.

Targets: mixed traffic keeps >= 60% of the one-adapter throughput; swap p95 <= 5x the plain copy of its bytes.

    python -m benchmarks.serve_bench [--engine vllm] [--dtype float32] [--max-tokens 32] [--swaps 20] [--duration 20]

Prints the tables and writes benchmarks/results/serve_bench.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
import uuid
from pathlib import Path

import torch
from safetensors import safe_open

from benchmarks.common import command_line, machine_load, require_positive
from merger.demo import build_demo_model
from merger.fs import write_atomic
from merger.merge import merge
from service.engines import engine_factory
from service.engines.base import GenerationRequest, SamplingOptions
from service.merging import keep_fused_tensors
from service.scheduling.scheduler import Scheduler
from service.settings import Settings
from tests.support.adapters import write_random_adapter

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
CONCURRENCY = (1, 4, 16)
ADAPTER_NAMES = ("a0", "a1", "a2")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def fused_file(base: Path, root: Path, name: str, seed: int) -> Path:
    adapter = write_random_adapter(root / f"{name}-adapter", base, r=8, alpha=16, seed=seed, targets=TARGETS)
    merged = root / f"{name}-merged"
    merge(base, adapter, merged, progress=False)
    keys = tuple(key for key in sorted(_weight_keys(merged)))
    keep_fused_tensors(merged, keys, root / f"{name}.safetensors")
    return root / f"{name}.safetensors"


def _weight_keys(merged: Path) -> list[str]:
    import json

    return [f"{m}.weight" for m in json.loads((merged / "d2lora_merge.json").read_text())["modules"]]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(scheduler: Scheduler, model: str, max_tokens: int) -> tuple[float, int]:
    """(latency s, tokens generated) of one greedy completion with exactly max_tokens tokens."""
    options = SamplingOptions(max_tokens=max_tokens, temperature=0.0)
    start, tokens = time.perf_counter(), 0
    async for chunk in scheduler.generate(model, GenerationRequest(uuid.uuid4().hex, PROMPT, options)):
        tokens += chunk.new_tokens
    return time.perf_counter() - start, tokens


async def traffic(
    scheduler: Scheduler, models: tuple[str, ...], clients: int, duration_s: float, max_tokens: int
) -> dict:
    """`clients` closed-loop clients, each sending requests one after another until `duration_s` is over.

    Client i's k-th request goes to models[(i + k) % len(models)], so every client spreads its own traffic
    evenly; throughput counts every token generated until the last request in flight has finished.
    """
    deadline = time.perf_counter() + duration_s

    async def client(offset: int) -> list[tuple[float, int]]:
        results, models_in_turn = [], itertools.islice(itertools.cycle(models), offset, None)
        while time.perf_counter() < deadline:
            results.append(await one_request(scheduler, next(models_in_turn), max_tokens))
        return results

    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(client(i) for i in range(clients))) for r in rs]
    wall = time.perf_counter() - start
    latencies = [latency for latency, _ in results]
    return {
        "tokens_per_s": sum(tokens for _, tokens in results) / wall,
        "requests": len(results),
        "p50": percentile(latencies, 0.5),
        "p95": percentile(latencies, 0.95),
    }


async def swap_seconds(scheduler: Scheduler, files: list[Path], swaps: int) -> list[float]:
    """Swap the idle engine round the adapters, timing what the scheduler's swap does; ends on the base."""
    slot, planner, seconds = scheduler.slots[0], scheduler.planner, []
    for weights in itertools.islice(itertools.cycle(files), swaps):
        start = time.perf_counter()
        names = planner.names_of(weights)
        await slot.engine.load_weights(planner.plan(slot.names, weights))
        seconds.append(time.perf_counter() - start)
        slot.names, slot.weights = names, weights
    await slot.engine.load_weights(planner.plan(slot.names, None))
    slot.names, slot.weights = frozenset(), None
    return seconds


def copy_seconds(fused: Path, repeats: int) -> tuple[list[float], list[float]]:
    """(in-memory copy into preallocated buffers, read from the page cache + copy) of one swap's tensors."""
    with safe_open(fused, framework="pt") as f:
        sources = {name: f.get_tensor(name) for name in f}
    buffers = {name: torch.empty_like(t) for name, t in sources.items()}
    in_memory, from_file = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for name, tensor in sources.items():
            buffers[name].copy_(tensor)
        in_memory.append(time.perf_counter() - start)
        start = time.perf_counter()
        with safe_open(fused, framework="pt") as f:
            for name in f:
                buffers[name].copy_(f.get_tensor(name))
        from_file.append(time.perf_counter() - start)
    return in_memory, from_file


def settings_for(args: argparse.Namespace) -> Settings:
    return Settings(
        engine=args.engine,
        dtype=args.dtype,
        kv_cache_gib=2,
        max_num_seqs=32,
        max_model_len=512,
        max_waiting=1024,
        time_slice_s=args.time_slice,
    )


async def run(args: argparse.Namespace) -> str:
    settings = settings_for(args)
    base = build_demo_model(settings.cache_dir)
    root = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    files = [fused_file(base, root, name, seed) for seed, name in enumerate(ADAPTER_NAMES)]
    start = time.perf_counter()
    scheduler = await Scheduler.create(settings, base, engine_factory(settings))
    started = time.perf_counter() - start
    for name, fused in zip(ADAPTER_NAMES, files, strict=True):
        await scheduler.add_model(name, fused)
    try:
        await traffic(scheduler, ADAPTER_NAMES, 2, 1.0, 4)  # warm-up: every adapter swapped in once
        rows = await traffic_rows(scheduler, args)
        swaps = await swap_seconds(scheduler, files, args.swaps)
    finally:
        await scheduler.stop()
    in_memory, from_file = copy_seconds(files[0], args.swaps)
    nbytes = files[0].stat().st_size
    return report(
        args,
        started,
        rows,
        swaps,
        {"plain copy into preallocated buffers": in_memory, "read from page cache + copy": from_file},
        nbytes,
    )


async def traffic_rows(scheduler: Scheduler, args: argparse.Namespace) -> list[tuple[int, dict, dict]]:
    rows = []
    for clients in CONCURRENCY:
        single = await traffic(scheduler, ADAPTER_NAMES[:1], clients, args.duration, args.max_tokens)
        mixed = await traffic(scheduler, ADAPTER_NAMES, clients, args.duration, args.max_tokens)
        rows.append((clients, single, mixed))
    return rows


def report(args, started: float, rows, swaps, baselines: dict[str, list[float]], nbytes: int) -> str:
    lines = [
        f"engine {args.engine}, {args.dtype}, {args.max_tokens} tokens per request, greedy, time slice "
        f"{args.time_slice} s; {args.duration:.0f} s of closed-loop traffic per cell; engine start "
        f"{started:.1f} s",
        "",
        "| clients | one adapter tok/s | p50 / p95 s | requests | 3 adapters tok/s | p50 / p95 s | requests "
        "| mixed ÷ one |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for clients, single, mixed in rows:
        lines.append(
            f"| {clients} | {single['tokens_per_s']:.1f} | {single['p50']:.2f} / {single['p95']:.2f} | "
            f"{single['requests']} | {mixed['tokens_per_s']:.1f} | {mixed['p50']:.2f} / {mixed['p95']:.2f} | "
            f"{mixed['requests']} | "
            f"{mixed['tokens_per_s'] / single['tokens_per_s']:.2f} (target ≥ 0.60) |"
        )
    copy_p95 = percentile(baselines["plain copy into preallocated buffers"], 0.95)
    lines += [
        "",
        f"| swap of {nbytes / 1e6:.0f} MB (120 q/k/v/o tensors) | p50 ms | p95 ms | swap p95 ÷ this |",
        "|---|---|---|---|",
    ]
    timed = {"scheduler swap (plan + engine.load_weights)": swaps, **baselines}
    for label, values in timed.items():
        lines.append(
            f"| {label} | {1e3 * percentile(values, 0.5):.1f} | {1e3 * percentile(values, 0.95):.1f} | "
            f"{percentile(swaps, 0.95) / percentile(values, 0.95):.1f} |"
        )
    lines.append(f"\nswap p95 ÷ plain copy p95 = {percentile(swaps, 0.95) / copy_p95:.1f} (target ≤ 5)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="vllm")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of traffic per row and pattern")
    parser.add_argument("--time-slice", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "serve_bench.md")
    args = parser.parse_args(argv)
    require_positive(parser, args, ["max_tokens", "swaps", "duration"])
    load_before = machine_load()
    page = asyncio.run(run(args))
    page = (
        f"# Serving benchmark\n\n`{command_line('benchmarks.serve_bench', argv)}` — {load_before} at start, "
        f"{machine_load()} at end\n\n{page}\n"
    )
    print(page)
    write_atomic(args.out, page)


if __name__ == "__main__":
    main()
