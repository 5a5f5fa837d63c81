"""Many adapters in one batch (issue 11): vLLM's own benchmark client against `d2lora serve` and bare vLLM.

In one run on the demo model (SmolLM2-135M-Instruct, fp32, eager, max_num_seqs 64, 2 GiB KV cache),
`vllm bench serve` (random dataset, `--num-prompts` × `--input-len` / `--output-len` tokens,
`--concurrency` at a time, EOS ignored, adapters random per request) measures output tok/s and
mean / p99 TTFT for:

- bare vLLM on the base (in-process engine): the anchor;
- `d2lora serve` with one model (a D²-LoRA adapter, r=8), then 2, 8 and 32 adapters random per
  request, every one uploaded through POST /adapters;
- bare vLLM's own multi-LoRA (`--enable-lora`) with PEFT LoRA adapters of equal rank (r = 2·8 = 16,
  as the D²-LoRA form has rank 2r) at the same counts.

Targets (the issue's): 8 adapters >= 0.75x and 32 >= 0.70x the one-model throughput, p99 TTFT <= 2x
the one-model's, ahead of vLLM's multi-LoRA at every count.

    python -m benchmarks.mixed_serving [--counts 1,2,8,32] [--num-prompts 64] [--concurrency 16]

Writes benchmarks/results/mixed_serving.md and .json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from benchmarks.common import command_line, machine_load, markdown_table, require_positive
from benchmarks.machine import machine_info, machine_line
from benchmarks.vllm_client import random_traffic, run_client
from merger.demo import build_demo_model, default_cache_dir
from merger.fs import write_atomic
from tests.support.adapters import write_random_adapter
from tests.support.live import LiveServer, free_port
from tests.support.processes import running
from tests.support.uploading import upload_files

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ENGINE_ENV = {"D2LORA_DTYPE": "float32", "D2LORA_MAX_NUM_SEQS": "64", "D2LORA_KV_CACHE_GIB": "2"}
START_TIMEOUT_S = 600


def build_adapters(base: Path, root: Path, count: int) -> tuple[dict[str, Path], dict[str, Path]]:
    """(ours, vLLM's): `count` D²-LoRA r=8 artifacts, and as many PEFT LoRA r=16 ones, on q/k/v/o."""
    ours = {
        f"task-{i:02d}": write_random_adapter(root / f"d2lora-{i:02d}", base, "D2LORA", r=8, alpha=16, seed=i,
                                              targets=TARGETS, relative_size=0.05)
        for i in range(count)
    }  # fmt: skip
    peft = {
        f"lora-{i:02d}": write_random_adapter(root / f"lora-{i:02d}", base, "LORA", r=16, alpha=32, seed=100 + i,
                                              targets=TARGETS, relative_size=0.05)
        for i in range(count)
    }  # fmt: skip
    return ours, peft


def measure(url: str, model: str, base: Path, loras: list[str], args: argparse.Namespace) -> dict:
    """A warm-up run, then the measured one; the row of vLLM's numbers we report."""
    flags = ["--lora-modules", *loras] if loras else []
    warm = random_traffic(args.concurrency, args.concurrency, args.input_len, 16, seed=1)
    run_client(url, model, base, [*warm, *flags])
    result = run_client(url, model, base, [*random_traffic(args.num_prompts, args.concurrency, args.input_len,
                                                           args.output_len, seed=0), *flags])  # fmt: skip
    return {
        "output_tok_s": round(result["output_throughput"], 1),
        "mean_ttft_s": round(result["mean_ttft_ms"] / 1000, 2),
        "p99_ttft_s": round(result["p99_ttft_ms"] / 1000, 2),
        "completed": result["completed"],
    }


def ours(base: Path, adapters: dict[str, Path], args: argparse.Namespace, scratch: Path) -> list[dict]:
    env = {**ENGINE_ENV, "D2LORA_API_KEYS": "", "D2LORA_MAX_LORAS": str(args.max_loras)}
    server = LiveServer(base, scratch / "data", scratch, "vllm", **env)
    server.start()
    try:
        for name, folder in adapters.items():
            response = upload_files(server, name, folder)
            response.raise_for_status()
        names, rows = list(adapters), []
        for count in args.counts:
            model, loras = (names[0], []) if count == 1 else (server.base_name, names[:count])
            rows.append({"server": "d2lora serve", "adapters": count, **measure(server.url, model, base, loras, args)})
            print(rows[-1], flush=True)
        return rows
    finally:
        server.stop()


@contextlib.contextmanager
def bare_vllm(base: Path, log: Path, lora_modules: dict[str, Path], max_loras: int) -> Iterator[str]:
    """vLLM's own OpenAI server, engine in-process, the same engine settings; its URL once ready."""
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
               "--served-model-name", base.name, "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
               "--enforce-eager", "--max-num-seqs", "64", "--seed", "0"]  # fmt: skip
    if lora_modules:
        command += ["--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", "16",
                    "--max-cpu-loras", str(max(len(lora_modules), max_loras)),
                    "--lora-modules", *(f"{name}={path}" for name, path in lora_modules.items())]  # fmt: skip
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
    url = f"http://127.0.0.1:{port}"
    with running(command, f"{url}/v1/models", log, env, timeout_s=START_TIMEOUT_S):
        yield url


def vllm_rows(base: Path, peft: dict[str, Path], args: argparse.Namespace, scratch: Path) -> list[dict]:
    with bare_vllm(base, scratch / "vllm-base.log", {}, args.max_loras) as url:
        rows = [{"server": "bare vLLM, base", "adapters": 0, **measure(url, base.name, base, [], args)}]
    with bare_vllm(base, scratch / "vllm-lora.log", peft, args.max_loras) as url:
        names = list(peft)
        for count in args.counts:
            loras = names[:count]
            rows.append({"server": "vLLM multi-LoRA", "adapters": count, **measure(url, base.name, base, loras, args)})
            print(rows[-1], flush=True)
    return rows


def page(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    one = next(r for r in rows if r["server"] == "d2lora serve" and r["adapters"] == 1)
    table = [
        [r["server"], r["adapters"], r["output_tok_s"], f"{r['output_tok_s'] / one['output_tok_s']:.2f}×",
         f"{r['mean_ttft_s']} / {r['p99_ttft_s']}"]
        for r in rows
    ]  # fmt: skip
    headers = ["server", "adapters", "output tok/s", "÷ d2lora one model", "mean / p99 TTFT s"]
    return "\n".join([
        "# Many adapters in one batch: vLLM's benchmark client against d2lora serve and bare vLLM",
        "",
        f"`{command}`",
        "",
        f"{machine_line(machine_info())}; load before the run: {args.load_before}",
        "",
        f"Random dataset, {args.num_prompts} requests × {args.input_len} prompt / {args.output_len} output tokens, "
        f"{args.concurrency} concurrent, EOS ignored; adapters random per request (vLLM's `--lora-assignment random`); "
        f"SmolLM2-135M-Instruct fp32, eager, max_num_seqs 64, 2 GiB KV cache, max_loras {args.max_loras}. "
        "d2lora serve: D²-LoRA r=8 adapters (per-request rank 16), uploaded through POST /adapters. "
        "vLLM multi-LoRA: PEFT LoRA r=16, the same rank.",
        "",
        markdown_table(headers, table),
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2, 8, 32])
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-loras", type=int, default=16)
    parser.add_argument("--skip-vllm", action="store_true", help="only the d2lora serve rows")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "mixed_serving.md")
    args = parser.parse_args(argv)
    require_positive(parser, args, ["num_prompts", "concurrency", "input_len", "output_len", "max_loras"])
    args.load_before = machine_load()
    base = build_demo_model(default_cache_dir())
    with tempfile.TemporaryDirectory(prefix="mixed-serving-") as tmp:
        scratch = Path(tmp)
        adapters, peft = build_adapters(base, scratch / "adapters", max(args.counts))
        rows = ours(base, adapters, args, scratch)
        if not args.skip_vllm:
            rows += vllm_rows(base, peft, args, scratch)
    command = command_line("benchmarks.mixed_serving", argv)
    write_atomic(args.out, page(rows, args, command))
    write_atomic(args.out.with_suffix(".json"), json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    print(page(rows, args, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
