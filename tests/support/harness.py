"""EleutherAI's lm-evaluation-harness on local tasks: task YAMLs over JSON data files (no hub), runs, and each
document's result (per-choice log-likelihoods, correctness, generation).

Two model types: `local-completions` (our live server's /v1/completions, the same requests a user's lm-eval
sends) and `hf` (transformers on a checkpoint folder, e.g. the merger's merged output).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when `datasets` is imported


def _write_task(folder: Path, name: str, docs: list[dict], task: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.json"
    data.write_text(json.dumps(docs))
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        **task,
    }
    (folder / f"{name}.yaml").write_text(json.dumps(spec, indent=2))  # JSON is YAML
    return folder


def write_multiple_choice_task(folder: Path, name: str, docs: list[dict], target_delimiter: str = " ") -> Path:
    """docs: {"context", "choices", "answer"}; each choice is scored as context + target_delimiter + choice."""
    task = {
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": target_delimiter,
        "metric_list": [{"metric": "acc"}],
    }
    return _write_task(folder, name, docs, task)


def write_generation_task(folder: Path, name: str, docs: list[dict], until: list[str], max_gen_toks: int) -> Path:
    """docs: {"context", "target"}; greedy generation up to `until`, scored by exact match."""
    task = {
        "output_type": "generate_until",
        "doc_to_text": "context",
        "doc_to_target": "target",
        "generation_kwargs": {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False, "temperature": 0},
        "metric_list": [{"metric": "exact_match"}],
    }
    return _write_task(folder, name, docs, task)


def served(url: str, model: str, tokenizer_dir: Path, tokenized: bool, batch_size: int = 8) -> tuple[str, dict]:
    """lm-eval's `local-completions` on a live server (OPENAI_API_KEY in the environment is its bearer token)."""
    return "local-completions", {
        "model": model,
        "base_url": f"{url}/v1/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": str(tokenizer_dir),
        "tokenized_requests": tokenized,
        "batch_size": batch_size,
        "max_retries": 1,
        "timeout": 600,
    }


def transformers_model(checkpoint: Path, dtype: str = "float32", batch_size: int = 8) -> tuple[str, dict]:
    """lm-eval's `hf` model on a checkpoint folder, on the CPU."""
    return "hf", {"pretrained": str(checkpoint), "dtype": dtype, "device": "cpu", "batch_size": batch_size}


@dataclasses.dataclass(frozen=True)
class DocResult:
    doc_id: int
    loglikelihoods: tuple[float, ...] = ()  # multiple choice: per choice
    correct: bool | None = None  # multiple choice: acc; generation: exact match
    generation: str | None = None


def evaluate(model: tuple[str, dict], task_dir: Path, tasks: list[str]) -> dict[str, list[DocResult]]:
    """Run lm-eval; task name -> its documents' results in document order."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    kind, args = model
    batch_size = args.pop("batch_size", 1) if kind == "hf" else None
    results = simple_evaluate(
        model=kind,
        model_args=args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(task_dir)),
        batch_size=batch_size,
        log_samples=True,
    )
    assert results is not None  # None only on non-zero ranks of a distributed run
    return {task: sorted(map(_doc_result, results["samples"][task]), key=lambda d: d.doc_id) for task in tasks}


def _doc_result(sample: dict) -> DocResult:
    if "acc" in sample:
        return DocResult(
            sample["doc_id"], tuple(float(r[0]) for r in sample["filtered_resps"]), correct=bool(sample["acc"])
        )
    return DocResult(sample["doc_id"], correct=bool(sample["exact_match"]), generation=sample["filtered_resps"][0])
