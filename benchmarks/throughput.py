"""Evaluation throughput: unmerged vs merged, the paper's ~1.91×, and swap latency on vLLM.

Four ways to serve one trained demo adapter (date-iso) on the demo model, side
by side in one process, interleaved round by round so machine load hits all alike:

    unmerged-recompute  merger.unmerged, the row scale n0/n′ recomputed every forward (the training-time path)
    unmerged-cached     merger.unmerged, the row scale computed once
    merged-hf           the `d2lora merge` checkpoint in transformers
    merged-vllm         the service's vLLM engine (service.engines.vllm) holding the merged tensors,
                        swapped in by the service's SwapPlanner + engine.load_weights

For batch 1 and batch 16 (items or prompts in flight at once):
- items/s of the multiple-choice evaluation (benchmarks.scoring; on vLLM the same
  log-likelihoods come from `prompt_logprobs`), and the accuracy each path gets;
- generated tokens/s of greedy decoding, exactly --new-tokens per prompt (EOS ignored).

Then the swap latency distribution of the engine (planner + load_weights, round
the two demo adapters and the base) beside a plain in-memory copy of the same
tensors (benchmarks.serve_bench.copy_seconds).  Writes benchmarks/results/throughput.json.

    python -m benchmarks.throughput [--dtype bfloat16] [--rounds 2] [--new-tokens 32] [--swaps 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import command_line, require_positive
from benchmarks.fidelity import THREADS_HELP, load_checkpoint
from benchmarks.machine import machine_info
from benchmarks.runners import HfRunner, Runner, VllmRunner
from benchmarks.scoring import EncodedItem, chunks, encode_item, pad_token_id
from benchmarks.serve_bench import copy_seconds
from merger.artifact import Adapter
from merger.fs import write_atomic
from merger.merge import merge
from merger.unmerged import load_unmerged
from service.engines.weights import SwapPlanner
from service.merging import keep_fused_tensors

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TASK = "date-iso"
BATCHES = (1, 16)
PATHS = ("unmerged-recompute", "unmerged-cached", "merged-hf", "merged-vllm")


def fused_tensors(base_dir: Path, adapter_dir: Path, dtype: str, scratch: Path) -> tuple[Path, Path]:
    """(merged checkpoint folder, safetensors file of its fused tensors only), as the service keeps them."""
    merged = merge(base_dir, adapter_dir, scratch / f"merged-{adapter_dir.name}", dtype=dtype, progress=False).out_dir
    from merger.checkpoint import CheckpointReader

    reader = CheckpointReader(base_dir)
    keys = tuple(m.weight_key for m in Adapter.load(adapter_dir).bind(reader.shapes()))
    reader.close()
    fused = scratch / f"{adapter_dir.name}.safetensors"
    keep_fused_tensors(merged, keys, fused)
    return merged, fused


def hf_runners(base_dir: Path, adapter_dir: Path, merged_dir: Path, dtype: torch.dtype, pad_id: int) -> dict:
    adapter = Adapter.load(adapter_dir)
    return {
        "unmerged-recompute": HfRunner(load_unmerged(base_dir, adapter, dtype, recompute_scale=True), pad_id),
        "unmerged-cached": HfRunner(load_unmerged(base_dir, adapter, dtype, recompute_scale=False), pad_id),
        "merged-hf": HfRunner(load_checkpoint(merged_dir, dtype), pad_id),
    }


def timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


async def measure(
    runner: Runner, items: list[EncodedItem], prompts: list[tuple[int, ...]], batch: int, new_tokens: int
) -> dict:
    """items/s over `items` scored `batch` at a time; tokens/s over `prompts` generated `batch` at a time."""
    start = time.perf_counter()
    answers = [a for chunk in chunks(items, batch) for a in await runner.score(chunk)]
    score_s = time.perf_counter() - start
    start = time.perf_counter()
    generated = sum([await runner.generate(chunk, new_tokens) for chunk in chunks(prompts, batch)])
    generate_s = time.perf_counter() - start
    correct = sum(a == item.answer for a, item in zip(answers, items, strict=True))
    return {
        "items_per_s": len(items) / score_s,
        "tokens_per_s": generated / generate_s,
        "accuracy": 100 * correct / len(items),
        "answers": answers,
    }


def workload(items: list[EncodedItem], batch: int, args: argparse.Namespace):
    """The items and generation prompts of one batch size: batch 1 runs fewer of both."""
    count = args.items_b1 if batch == 1 else args.items_b16
    prompts = [item.prompt_ids for item in items[: (args.prompts_b1 if batch == 1 else batch)]]
    return items[:count], prompts


async def rounds(runners: dict[str, Runner], items: list[EncodedItem], args: argparse.Namespace) -> dict:
    """Every path × batch once per round, interleaved; all rounds kept (medians taken by the report)."""
    for runner in runners.values():  # warm-up: first-call costs (allocations, kernels) off the clock
        await measure(runner, items[:2], [items[0].prompt_ids], 2, 2)
    runs = {path: {str(b): [] for b in BATCHES} for path in runners}
    for index in range(args.rounds):
        for path, runner in runners.items():
            for batch in BATCHES:
                batch_items, prompts = workload(items, batch, args)
                result = await measure(runner, batch_items, prompts, batch, args.new_tokens)
                runs[path][str(batch)].append(result)
                print(
                    f"round {index} {path} batch {batch}: {result['items_per_s']:.2f} items/s, "
                    f"{result['tokens_per_s']:.1f} tok/s, acc {result['accuracy']:.1f}%",
                    flush=True,
                )
    return runs


async def swap_latencies(engine, planner: SwapPlanner, files: list[Path | None], swaps: int) -> list[float]:
    """Seconds of planner.plan + engine.load_weights, cycling over the files (None = the base); ends on the base."""
    current, seconds = frozenset(), []
    for index in range(swaps):
        weights = files[index % len(files)]
        start = time.perf_counter()
        await engine.load_weights(planner.plan(current, weights))
        seconds.append(time.perf_counter() - start)
        current = planner.names_of(weights)
    await engine.load_weights(planner.plan(current, None))
    return seconds


def summarise(runs: dict) -> dict:
    """Medians over rounds per path and batch, and the merged ÷ unmerged ratios."""
    medians = {
        path: {
            batch: {
                key: statistics.median(r[key] for r in results) for key in ("items_per_s", "tokens_per_s", "accuracy")
            }
            for batch, results in by_batch.items()
        }
        for path, by_batch in runs.items()
    }
    ratios = {
        f"{num} / {den}": {
            batch: {key: medians[num][batch][key] / medians[den][batch][key] for key in ("items_per_s", "tokens_per_s")}
            for batch in medians[num]
        }
        for num, den in RATIO_PAIRS
        if num in medians and den in medians
    }
    return {"medians": medians, "ratios": ratios}


RATIO_PAIRS = (
    ("merged-hf", "unmerged-recompute"),
    ("merged-hf", "unmerged-cached"),
    ("unmerged-cached", "unmerged-recompute"),
    ("merged-vllm", "unmerged-recompute"),
    ("merged-vllm", "merged-hf"),
)


def answer_agreement(runs: dict, reference: str = "merged-hf") -> dict:
    """Per path, how many of the largest workload's answers differ from the reference path's (last round)."""
    batch = str(BATCHES[-1])
    ref = runs[reference][batch][-1]["answers"]
    return {
        path: sum(a != b for a, b in zip(by_batch[batch][-1]["answers"], ref, strict=True))
        for path, by_batch in runs.items()
    }


async def start_vllm(base_dir: Path, args: argparse.Namespace):
    from service.engines.vllm import VllmEngine
    from service.settings import Settings

    settings = Settings(engine="vllm", dtype=args.dtype, kv_cache_gib=1, max_num_seqs=64, max_model_len=512)
    engine = VllmEngine(settings)
    start = time.perf_counter()
    await engine.start(base_dir)
    return engine, time.perf_counter() - start


async def run(args: argparse.Namespace) -> dict:
    from merger.demo import build_demo_model
    from merger.probes import load_tokenizer
    from merger.train.tasks import DEMO_TASKS, build_demo_adapters
    from service.settings import Settings

    cache_dir = Settings().cache_dir
    base_dir = build_demo_model(cache_dir)
    adapters = build_demo_adapters(cache_dir, base_dir)
    tokenizer = load_tokenizer(base_dir)
    items = [encode_item(tokenizer, e) for e in DEMO_TASKS[TASK].examples("eval", max(args.items_b1, args.items_b16))]
    record = {
        "machine": machine_info(),
        "command": args.command,
        "dtype": args.dtype,
        "task": TASK,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "vllm_threads_bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
        "workload": {"1": [args.items_b1, args.prompts_b1], "16": [args.items_b16, 16]},
    }
    with tempfile.TemporaryDirectory(prefix="throughput-") as scratch:
        fused = {task: fused_tensors(base_dir, path, args.dtype, Path(scratch)) for task, path in adapters.items()}
        runners = hf_runners(
            base_dir, adapters[TASK], fused[TASK][0], getattr(torch, args.dtype), pad_token_id(tokenizer)
        )
        engine, record["vllm_start_s"] = await start_vllm(base_dir, args)
        try:
            planner = SwapPlanner(engine.base)
            await engine.load_weights(planner.plan(frozenset(), fused[TASK][1]))
            runners["merged-vllm"] = VllmRunner(engine)
            runs = await rounds(runners, items, args)
            await engine.load_weights(planner.plan(planner.names_of(fused[TASK][1]), None))
            files = [f for _, f in fused.values()] + [None]
            record["swap_s"] = await swap_latencies(engine, planner, files, args.swaps)
        finally:
            await engine.stop()
        record["copy_s"], record["read_copy_s"] = copy_seconds(fused[TASK][1], args.swaps)
        record["swap_bytes"] = fused[TASK][1].stat().st_size
    record.update(summarise(runs), answer_flips_vs_merged_hf=answer_agreement(runs), runs=runs)
    record["load_average_end"] = machine_info()["load_average"]
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timed rounds (median reported)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt")
    parser.add_argument("--items-b1", type=int, default=16, help="items scored one at a time")
    parser.add_argument("--items-b16", type=int, default=64, help="items scored 16 at a time")
    parser.add_argument("--prompts-b1", type=int, default=2, help="prompts generated one at a time")
    parser.add_argument("--swaps", type=int, default=30, help="swaps timed on the vLLM engine")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP + "; vLLM's OpenMP threads too")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "throughput.json", help="where the result goes")
    args = parser.parse_args(argv)
    require_positive(parser, args, ("rounds", "new_tokens", "items_b1", "items_b16", "prompts_b1", "swaps", "threads"))
    args.command = command_line("benchmarks.throughput", argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0" if args.threads == 1 else f"0-{args.threads - 1}"  # same count
    record = asyncio.run(run(args))
    write_atomic(args.json, json.dumps(record, indent=2) + "\n")
    print(json.dumps({"medians": record["medians"], "ratios": record["ratios"]}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
