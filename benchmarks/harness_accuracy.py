"""Accuracy of the demo adapters served by `d2lora serve`, scored by lm-evaluation-harness, beside
benchmarks/fidelity.py's in-process scoring of the unmerged and merged models.

Per demo task (merger.train.tasks: date-iso, reading-qa), `--items` held-out multiple-choice items, each path
answers every item by the log-likelihood of its choices:

    unmerged-fp32   the adapter applied on the fly (merger.unmerged), fp32: THE REFERENCE
    merged-fp32     `d2lora merge --dtype float32`, transformers
    unmerged-bf16   the adapter on the fly on a bf16 base
    merged-bf16     `d2lora merge --dtype bfloat16` (Ŵ in fp32, cast once), transformers
    served-fp32     lm-eval `local-completions` (echo + logprobs, token ids) against `d2lora serve` on vLLM,
                    the adapter uploaded through POST /adapters and hot-swapped in; engine dtype float32
    served-bf16     the same with D2LORA_DTYPE=bfloat16 (the fp32 fused tensors are cast once on the swap)

The first four are scored by benchmarks.scoring (fidelity's own code); the items are tokenised as training
tokenises a prompt/completion pair (chat template, end-of-turn token), and lm-eval gets the same tokens: its
context is the templated prompt, each continuation a choice with its end-of-turn token.  (lm-eval moves the
template's trailing newline into the continuation: the same token after the same context for every choice,
so the ranking is unchanged; `split_mismatches` counts items whose token sequence would differ: 0 expected.)

Gaps in points, paired on the same items, with a 95% paired-bootstrap interval (benchmarks.paired):
merged − unmerged, served − unmerged, served − merged, per dtype.  Writes benchmarks/results/harness_accuracy.json
and .md.

    python -m benchmarks.harness_accuracy [--items 1000] [--tasks date-iso,reading-qa] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import command_line, markdown_table, pick, require_positive
from benchmarks.fidelity import REFERENCE, THREADS_HELP, VARIANTS, Workspace, score_all
from benchmarks.machine import machine_info, machine_line
from benchmarks.paired import accuracy, paired_gap
from benchmarks.scoring import EncodedItem, encode_item, pad_token_id
from merger.fs import write_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FIDELITY_PATHS = ("unmerged-fp32", "merged-fp32", "unmerged-bf16", "merged-bf16")
SERVED_DTYPES = {"served-fp32": "float32", "served-bf16": "bfloat16"}
GAPS = (
    ("merged-fp32", "unmerged-fp32"),
    ("served-fp32", "unmerged-fp32"),
    ("served-fp32", "merged-fp32"),
    ("merged-bf16", "unmerged-bf16"),
    ("served-bf16", "unmerged-bf16"),
    ("served-bf16", "merged-bf16"),
)


def harness_docs(tokenizer, items: list[EncodedItem]) -> list[dict]:
    """lm-eval documents of the same tokens: the templated prompt as context, each choice's tokens as a choice."""
    return [
        {
            "context": tokenizer.decode(item.prompt_ids),
            "choices": [tokenizer.decode(choice) for choice in item.choice_ids],
            "answer": item.answer,
        }
        for item in items
    ]


def split_mismatches(tokenizer, items: list[EncodedItem], docs: list[dict]) -> int:
    """Items where lm-eval's encoding of (context, choice) is not the item's token sequence (its `_encode_pair`:
    trailing whitespace of the context moves into the continuation, then context + continuation is tokenised)."""
    bad = 0
    for item, doc in zip(items, docs, strict=True):
        context = doc["context"].rstrip()
        for choice, tokens in zip(doc["choices"], item.choice_ids, strict=True):
            whole = tokenizer(context + doc["context"][len(context) :] + choice, add_special_tokens=False)["input_ids"]
            bad += whole != [*item.prompt_ids, *tokens]
    return bad


def fidelity_correct(ws: Workspace, items: list[EncodedItem], pad_id: int, batch_size: int) -> dict[str, list[bool]]:
    """benchmarks.fidelity's variants (FIDELITY_PATHS), each item right or wrong."""
    models = {v.key: v.build(ws, v.dtype) for v in VARIANTS if v.key in FIDELITY_PATHS}
    answers, _ = score_all(models, items, pad_id, batch_size)
    del models
    gc.collect()
    return {key: [a == item.answer for a, item in zip(given, items, strict=True)] for key, given in answers.items()}


def served_correct(
    base_dir: Path, adapters: dict[str, Path], docs: dict[str, list[dict]], dtype: str, engine: str, batch_size: int
) -> tuple[dict[str, list[bool]], float]:
    """lm-eval local-completions against one `d2lora serve` (`engine`, `dtype`) serving every task's adapter;
    task -> each item right or wrong, and the seconds lm-eval took (server start and uploads excluded)."""
    from tests.support.harness import evaluate, served, write_multiple_choice_task
    from tests.support.live import API_KEY, LiveServer
    from tests.support.uploading import upload_files

    os.environ["OPENAI_API_KEY"] = API_KEY
    with tempfile.TemporaryDirectory(prefix="harness-accuracy-") as scratch:
        root = Path(scratch)
        for task, task_docs in docs.items():
            write_multiple_choice_task(root / "tasks", task_name(task), task_docs, target_delimiter="")
        server = LiveServer(base_dir, root / "data", root, engine=engine, D2LORA_DTYPE=dtype)
        server.start()
        try:
            for task, adapter in adapters.items():
                response = upload_files(server, task, adapter)
                if response.status_code != 201:
                    raise RuntimeError(f"upload of {task} failed: {response.status_code} {response.text}")
            start, correct = time.perf_counter(), {}
            for task in docs:
                model = served(server.url, task, base_dir, tokenized=True, batch_size=batch_size)
                results = evaluate(model, root / "tasks", [task_name(task)])[task_name(task)]
                correct[task] = [bool(doc.correct) for doc in results]
            return correct, time.perf_counter() - start
        finally:
            server.stop()


def task_name(task: str) -> str:
    return f"d2lora_{task.replace('-', '_')}"


def task_record(correct: dict[str, list[bool]], mismatches: int) -> dict:
    return {
        "items": len(correct[REFERENCE]),
        "split_mismatches": mismatches,
        "accuracy": {path: accuracy(values) for path, values in correct.items()},
        "gaps": {f"{a} vs {b}": paired_gap(correct[a], correct[b]) for a, b in GAPS},
    }


def run(args: argparse.Namespace) -> dict:
    from merger.demo import build_demo_model
    from merger.probes import load_tokenizer
    from merger.train.tasks import DEMO_TASKS, build_demo_adapters
    from service.settings import Settings

    cache_dir = Settings().cache_dir
    base_dir = build_demo_model(cache_dir)
    adapters = {task: path for task, path in build_demo_adapters(cache_dir, base_dir).items() if task in args.tasks}
    tokenizer = load_tokenizer(base_dir)
    items = {t: [encode_item(tokenizer, e) for e in DEMO_TASKS[t].examples("eval", args.items)] for t in args.tasks}
    docs = {task: harness_docs(tokenizer, task_items) for task, task_items in items.items()}
    seconds: dict[str, float] = {}
    correct: dict[str, dict[str, list[bool]]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="harness-accuracy-merged-") as scratch:
        for task in args.tasks:
            ws = Workspace(base_dir, adapters[task], Path(scratch) / task)
            ws.scratch.mkdir()
            correct[task] = fidelity_correct(ws, items[task], pad_token_id(tokenizer), args.batch_size)
    seconds["fidelity"] = time.perf_counter() - start
    for path, dtype in SERVED_DTYPES.items():
        start = time.perf_counter()
        served, seconds[f"{path} lm-eval"] = served_correct(
            base_dir, adapters, docs, dtype, args.engine, args.batch_size
        )
        seconds[path] = time.perf_counter() - start
        for task, values in served.items():
            correct[task][path] = values
    return {
        "machine": machine_info(),
        "command": args.command,
        "items_per_task": args.items,
        "engine": args.engine,
        "torch_threads": torch.get_num_threads(),
        "seconds": seconds,
        "tasks": {t: task_record(correct[t], split_mismatches(tokenizer, items[t], docs[t])) for t in args.tasks},
    }


def markdown(record: dict) -> str:
    paths = [*FIDELITY_PATHS, *SERVED_DTYPES]
    accuracy_rows = [
        [task, result["items"], *(f"{result['accuracy'][p]:.2f}" for p in paths)]
        for task, result in record["tasks"].items()
    ]
    gap_rows = [
        [
            task,
            name,
            f"{g['gap_points']:+.2f}",
            f"[{g['ci95_points'][0]:+.2f}, {g['ci95_points'][1]:+.2f}]",
            g["better"],
            g["worse"],
        ]
        for task, result in record["tasks"].items()
        for name, g in result["gaps"].items()
    ]
    timings = ", ".join(f"{name} {value / 60:.1f} min" for name, value in record["seconds"].items())
    return "\n\n".join(
        [
            "# Accuracy through the server (lm-eval) beside fidelity's own scoring",
            f"`{record['command']}`  \n{machine_line(record['machine'])}; torch threads {record['torch_threads']}",
            f"Time: {timings}.",
            "Accuracy (%), multiple choice by log-likelihood:",
            markdown_table(["task", "items", *paths], accuracy_rows),
            "Gaps (points), paired on the same items; 95% paired-bootstrap interval; items the first path gets "
            "right and the second wrong (better) and the reverse (worse):",
            markdown_table(["task", "gap", "points", "95% interval", "better", "worse"], gap_rows),
            "lm-eval's token split differs from the items' tokens on "
            + ", ".join(f"{t}: {r['split_mismatches']}" for t, r in record["tasks"].items())
            + " (item, choice) pairs.",
        ]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from merger.train.tasks import DEMO_TASKS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1000, help="held-out items per task")
    parser.add_argument("--batch-size", type=int, default=16, help="items per forward pass / prompts per request")
    parser.add_argument("--tasks", default=",".join(DEMO_TASKS), help="comma-separated demo tasks")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--engine", choices=("vllm", "transformers"), default="vllm", help="the served engine")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "harness_accuracy", help="result path, no suffix")
    args = parser.parse_args(argv)
    require_positive(parser, args, ("items", "batch_size", "threads"))
    args.tasks = pick(parser, "--tasks", args.tasks, DEMO_TASKS)
    args.command = command_line("benchmarks.harness_accuracy", argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    record = run(args)
    write_atomic(args.out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    write_atomic(args.out.with_suffix(".md"), markdown(record) + "\n")
    print(markdown(record))


if __name__ == "__main__":
    main()
