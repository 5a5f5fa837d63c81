"""Engine-level benchmark of per-request adapters (issue 11): one AsyncLLM, many adapters in one batch.

Each row runs `--requests` completions of `--prompt-tokens` random prompt tokens and exactly `--output-tokens`
generated tokens (ignore_eos), `--concurrency` at a time, each request naming an adapter drawn at random
(seeded) from the row's adapters.  Rows, side by side in one run (one engine per configuration, each in its
own process, started one after the other):

- vLLM without LoRA: the base model as merged weights are served today (the one-model row);
- d2lora's engine (vLLM + the plugin: row scales, grouped CPU ops): no adapter (LoRA enabled, unused), then
  2, 8 and 32 per-request adapters (D²-LoRA r=8, DoRA r=16 and LoRA r=16 in turn: rank k = 16 each);
- vLLM's own multi-LoRA on the same folders read as plain PEFT LoRA adapters of rank 16 (no row scale, vLLM's
  CPU punica ops): what a vLLM user gets today, 2, 8 and 32 adapters.

Output tokens/s (all requests' tokens over the row's wall time) and mean / p99 time to first token; ratios are
to the one-model row of the same run, so a shared machine compares like with like.

    python -m benchmarks.lora_engine [--requests 64] [--concurrency 16] [--adapters 2,8,32] [--max-loras 16]

Writes benchmarks/results/lora_engine.md (and .json) with the command line and the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, command_line, machine_load, markdown_table, require_positive
from merger.fs import write_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
KINDS = (("D2LORA", 8), ("DORA", 16), ("LORA", 16))  # (kind, r): rank k = 16 for each
ENGINES = ("vllm-no-lora", "d2lora", "vllm-lora")


def make_forms(base: Path, root: Path, count: int) -> list[Path]:
    """`count` random per-request form folders for base (kinds in turn), realistic update size."""
    from merger.per_request import write_per_request_form
    from tests.support.adapters import write_random_adapter

    forms = []
    for i in range(count):
        kind, r = KINDS[i % len(KINDS)]
        artifact = write_random_adapter(
            root / f"a{i}-adapter", base, kind=kind, r=r, alpha=2 * r, seed=100 + i, targets=TARGETS, relative_size=0.05
        )
        write_per_request_form(base, artifact, root / f"a{i}")
        forms.append(root / f"a{i}")
    return forms


def engine_args(base: Path, engine: str, max_loras: int, max_num_seqs: int):
    from vllm import AsyncEngineArgs

    from service.engines.weights import BaseTensors

    lora = {}
    if engine != "vllm-no-lora":
        targets = BaseTensors(base).layer_linear_names()
        lora = {"enable_lora": True, "max_loras": max_loras, "max_cpu_loras": 64, "max_lora_rank": 16}
        lora["lora_target_modules"] = targets
    extension = (
        {"worker_extension_cls": "service.engines.vllm_worker.SwapWorkerExtension"} if engine == "d2lora" else {}
    )
    return AsyncEngineArgs(
        model=str(base),
        dtype="float32",
        enforce_eager=True,
        seed=0,
        max_model_len=1024,
        max_num_seqs=max_num_seqs,
        disable_log_stats=True,
        **lora,
        **extension,
    )


async def one_request(llm, prompt: list[int], output_tokens: int, lora) -> tuple[float, int]:
    """(seconds to the first token, tokens generated) of one greedy request of exactly output_tokens tokens."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        max_tokens=output_tokens, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )
    start, first, tokens = time.perf_counter(), None, 0
    async for out in llm.generate({"prompt_token_ids": prompt}, params, os.urandom(8).hex(), lora_request=lora):
        tokens += len(out.outputs[0].token_ids)
        if first is None and tokens:
            first = time.perf_counter() - start
    return first or 0.0, tokens


async def row(llm, loras: list, prompts: list[list[int]], output_tokens: int, concurrency: int, seed: int) -> dict:
    """Closed loop: `concurrency` clients work through the requests; each request names a random adapter."""
    picks = random.Random(seed)
    chosen = [picks.choice(loras) for _ in prompts] if loras else [None] * len(prompts)
    queue = list(zip(prompts, chosen, strict=True))
    ttfts: list[float] = []
    total = 0

    async def client() -> None:
        nonlocal total
        while queue:
            prompt, lora = queue.pop()
            ttft, tokens = await one_request(llm, prompt, output_tokens, lora)
            ttfts.append(ttft)
            total += tokens

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ttfts.sort()
    return {
        "tok_s": total / wall,
        "ttft_mean": statistics.fmean(ttfts),
        "ttft_p99": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
        "wall_s": wall,
    }


async def run_engine(config: dict) -> dict:
    """Child side: one engine, its rows, in this process."""
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"})
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    if config["engine"] == "vllm-lora":
        os.environ["VLLM_PLUGINS"] = ""  # vLLM as its users run it: no general plugin (d2lora's included)
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    base, forms = Path(config["base"]), [Path(p) for p in config["forms"]]
    gen = random.Random(0)
    prompts = [[gen.randrange(100, 40000) for _ in range(config["prompt_tokens"])] for _ in range(config["requests"])]
    start = time.perf_counter()
    llm = AsyncLLM.from_engine_args(engine_args(base, config["engine"], config["max_loras"], config["max_num_seqs"]))
    results = {"start_s": time.perf_counter() - start, "rows": {}}
    try:
        lora_on = config["engine"] != "vllm-no-lora"
        loras = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(forms)] if lora_on else []
        warm = loras[: config["max_loras"]] if loras else []
        await row(llm, warm, prompts[: config["concurrency"]], 8, config["concurrency"], seed=1)  # load + warm up
        for count in config["counts"]:
            chosen = loras[:count]
            results["rows"][str(count)] = await row(
                llm, chosen, prompts, config["output_tokens"], config["concurrency"], seed=count
            )
    finally:
        llm.shutdown()
    return results


def run_child(config: dict) -> dict:
    """Run one engine's rows in a fresh interpreter; its results."""
    with tempfile.TemporaryDirectory(prefix="lora-engine-") as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TQDM_DISABLE": "1"}
        command = [sys.executable, "-m", "benchmarks.lora_engine", "--child", json.dumps(config), str(result)]
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, timeout=7200, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0 or not result.is_file():
            raise RuntimeError(
                f"{config['engine']} exited {done.returncode}: " + " | ".join(done.stderr.splitlines()[-8:])
            )
        return json.loads(result.read_text())


def table(results: dict[str, dict], counts: list[int]) -> str:
    one = results["vllm-no-lora"]["rows"]["0"]

    def line(label: str, cell: dict) -> list[str]:
        return [
            label,
            f"{cell['tok_s']:.0f} ({cell['tok_s'] / one['tok_s']:.2f}×)",
            f"{cell['ttft_mean']:.2f} / {cell['ttft_p99']:.2f} s ({cell['ttft_p99'] / one['ttft_p99']:.2f}×)",
        ]

    rows = [line("1 model, vLLM without LoRA (merged weights)", one)]
    rows.append(line("1 model, d2lora engine with LoRA enabled, no adapter", results["d2lora"]["rows"]["0"]))
    for count in counts:
        rows.append(
            line(
                f"{count} per-request adapters, d2lora (row scale + grouped ops)", results["d2lora"]["rows"][str(count)]
            )
        )
        rows.append(
            line(f"{count} PEFT LoRA r=16, vLLM's own CPU multi-LoRA", results["vllm-lora"]["rows"][str(count)])
        )
    return markdown_table(["traffic", "output tok/s (÷ one model)", "mean / p99 TTFT (p99 ÷ one model)"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--adapters", default="2,8,32", help="comma list of adapter counts")
    parser.add_argument("--max-loras", type=int, default=16, help="vLLM's LoRA slots (both LoRA engines)")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        write_atomic(Path(args.child[1]), json.dumps(asyncio.run(run_engine(json.loads(args.child[0])))))
        return 0
    require_positive(parser, args, ["requests", "concurrency", "prompt_tokens", "output_tokens", "max_loras"])
    counts = [int(c) for c in args.adapters.split(",")]
    from merger.demo import build_demo_model, default_cache_dir

    base = build_demo_model(default_cache_dir())
    with tempfile.TemporaryDirectory(prefix="lora-forms-") as tmp:
        forms = make_forms(base, Path(tmp), max(counts))
        common = {
            "base": str(base),
            "forms": [str(f) for f in forms],
            "requests": args.requests,
            "concurrency": args.concurrency,
            "prompt_tokens": args.prompt_tokens,
            "output_tokens": args.output_tokens,
            "max_loras": args.max_loras,
            "max_num_seqs": args.max_num_seqs,
        }
        plans = {"vllm-no-lora": [0], "d2lora": [0, *counts], "vllm-lora": counts}
        loads, results = [machine_load()], {}
        for engine, rows in plans.items():
            results[engine] = run_child({**common, "engine": engine, "counts": rows})
            loads.append(machine_load())
            print(engine, json.dumps(results[engine]["rows"]), flush=True)
    text = table(results, counts)
    print(text)
    page = (
        "# Per-request adapters, engine level (issue 11)\n\n"
        f"`{command_line('benchmarks.lora_engine', argv)}`\n\n"
        f"SmolLM2-135M fp32, eager, {args.requests} requests × {args.prompt_tokens} prompt / {args.output_tokens} "
        f"output tokens (ignore_eos), {args.concurrency} concurrent, max_loras {args.max_loras}; adapters on "
        "q/k/v/o, D²-LoRA r=8 / DoRA r=16 / LoRA r=16 in turn (k = 16), random per request.\n\n"
        f"{text}\n\nMachine: {' → '.join(loads)}.\n"
    )
    args.results.mkdir(parents=True, exist_ok=True)
    write_atomic(args.results / "lora_engine.md", page)
    write_atomic(
        args.results / "lora_engine.json",
        json.dumps({"command": command_line("benchmarks.lora_engine", argv), "results": results}, indent=2),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
