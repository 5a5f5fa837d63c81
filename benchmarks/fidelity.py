"""Fidelity benchmark: is serving the merged model the same as serving the adapter unmerged?

The paper reports a mean accuracy gap of about 0.03 points (worst 0.7) between
merged and unmerged D²-LoRA models.  Here, on the demo model and each demo task
(its D²-LoRA adapter trained once by merger.train.tasks.build_demo_adapters),
every variant answers the same held-out multiple-choice items, scored by the
log-likelihood of each choice (benchmarks.scoring):

    base-fp32       the base model without the adapter (what training changed)
    unmerged-fp32   the adapter applied on the fly in fp32: THE REFERENCE
    merged-fp32     `d2lora merge --dtype float32`
    unmerged-bf16   the adapter applied on the fly on a bf16 base
    merged-bf16     `d2lora merge --dtype bfloat16`: Ŵ in fp32, cast once
    naive-bf16      Ŵ computed in bf16 arithmetic, as a tool that casts first would
                    (a few lines below, benchmark only; the merger never does this)

Per task and variant: accuracy, the gap in points to the unmerged model of the
same dtype, how many answers flipped, and logit statistics against the
reference at every position that predicts a choice token (max |Δlogit|, mean
KL, top-1 agreement).  Writes benchmarks/results/fidelity.json.

    python -m benchmarks.fidelity [--items 128] [--batch-size 8] [--tasks date-iso,reading-qa]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import command_line, pick, require_positive
from benchmarks.machine import machine_info
from benchmarks.scoring import (
    EncodedItem,
    chunks,
    encode_item,
    pad_token_id,
    score_batch,
)
from merger.artifact import Adapter
from merger.fs import write_atomic
from merger.kinds import ModuleAdapter
from merger.logits import mean_kl
from merger.merge import merge
from merger.unmerged import load_unmerged, model_shapes, module_path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# On 2 cores shared with other work, torch's OpenMP threads spin-wait on each other: one forward of the
# demo model took 7x longer with 2 threads than with 1 (load average ~15).  1 is the default here.
THREADS_HELP = "torch intra-op threads (1 on a shared, oversubscribed machine)"
REFERENCE = "unmerged-fp32"


@dataclasses.dataclass(frozen=True)
class Workspace:
    base_dir: Path
    adapter_dir: Path
    scratch: Path  # merged checkpoints go here


def load_checkpoint(folder: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def build_base(ws: Workspace, dtype: torch.dtype) -> nn.Module:
    return load_checkpoint(ws.base_dir, dtype)


def build_unmerged(ws: Workspace, dtype: torch.dtype) -> nn.Module:
    return load_unmerged(ws.base_dir, Adapter.load(ws.adapter_dir), dtype).eval()


def build_merged(ws: Workspace, dtype: torch.dtype) -> nn.Module:
    dtype_name = str(dtype).removeprefix("torch.")
    out = merge(ws.base_dir, ws.adapter_dir, ws.scratch / f"merged-{dtype_name}", dtype=dtype_name, progress=False)
    return load_checkpoint(out.out_dir, dtype)


def naive_bf16_fuse(w0: torch.Tensor, module: ModuleAdapter) -> torch.Tensor:
    """THE NAIVE PATH (benchmark only): SPEC §1's Ŵ with every operation in bf16.  w0: (out, in) bf16."""
    f = {name: t.to(torch.bfloat16) for name, t in module.factors.items()}
    positive = f["lora_B.weight"] @ f["lora_A.weight"]  # (out, in)
    negative = f["lora_B_neg.weight"] @ f["lora_A_neg.weight"]  # (out, in)
    delta = module.scaling * (positive - module.tau * negative)  # (out, in) bf16
    adapted = w0 + delta  # W′, rounded to bf16
    scale = w0.norm(dim=1, keepdim=True) / adapted.norm(dim=1, keepdim=True)  # (out, 1) bf16, ≈ 1 − 5e-4
    return scale * adapted + delta


@torch.no_grad()
def build_naive_bf16(ws: Workspace, dtype: torch.dtype) -> nn.Module:
    """The base loaded in bf16, each targeted weight overwritten by naive_bf16_fuse."""
    model = load_checkpoint(ws.base_dir, dtype)
    for module in Adapter.load(ws.adapter_dir).bind(model_shapes(model)):
        linear = model.get_submodule(module_path(model, module.path))
        linear.weight.copy_(naive_bf16_fuse(linear.weight, module))
    return model


@dataclasses.dataclass(frozen=True)
class Variant:
    key: str
    label: str
    dtype: torch.dtype
    build: Callable[[Workspace, torch.dtype], nn.Module]
    peer: str | None  # the unmerged variant of the same dtype, for the accuracy gap


VARIANTS = (
    Variant("base-fp32", "base model, no adapter (fp32)", torch.float32, build_base, None),
    Variant(REFERENCE, "unmerged fp32 (reference)", torch.float32, build_unmerged, None),
    Variant("merged-fp32", "merged fp32", torch.float32, build_merged, REFERENCE),
    Variant("unmerged-bf16", "unmerged bf16", torch.bfloat16, build_unmerged, None),
    Variant("merged-bf16", "merged bf16 (fp32 maths, cast once)", torch.bfloat16, build_merged, "unmerged-bf16"),
    Variant("naive-bf16", "merged bf16 (naive bf16 maths)", torch.bfloat16, build_naive_bf16, "unmerged-bf16"),
)


@dataclasses.dataclass
class LogitStats:
    """Running logit statistics of one variant against the reference."""

    positions: int = 0
    max_abs_logit_diff: float = 0.0
    kl_sum: float = 0.0
    top1_agree: int = 0

    def add(self, reference: torch.Tensor, candidate: torch.Tensor) -> None:  # both (positions, vocab) fp32
        n = reference.shape[0]
        self.positions += n
        self.max_abs_logit_diff = max(self.max_abs_logit_diff, (candidate - reference).abs().max().item())
        self.kl_sum += mean_kl(reference, candidate) * n
        self.top1_agree += int((candidate.argmax(-1) == reference.argmax(-1)).sum())

    def to_dict(self) -> dict:
        return {
            "positions": self.positions,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "mean_kl": self.kl_sum / max(1, self.positions),
            "top1_agreement": self.top1_agree / max(1, self.positions),
        }


def score_all(
    models: dict[str, nn.Module], items: list[EncodedItem], pad_id: int, batch_size: int
) -> tuple[dict[str, list[int]], dict[str, LogitStats]]:
    """Every variant's answers, and its logit statistics against the reference, batch by batch."""
    answers = {key: [] for key in models}
    stats = {key: LogitStats() for key in models}
    for batch in chunks(items, batch_size):
        reference = score_batch(models[REFERENCE], batch, pad_id)
        for key, model in models.items():
            scored = reference if key == REFERENCE else score_batch(model, batch, pad_id)
            answers[key] += scored.predictions()
            stats[key].add(reference.logits, scored.logits)
    return answers, stats


def flips(a: list[int], b: list[int]) -> int:
    return sum(x != y for x, y in zip(a, b, strict=True))


def variant_rows(items: list[EncodedItem], answers: dict[str, list[int]], stats: dict[str, LogitStats]) -> dict:
    truth = [item.answer for item in items]
    accuracy = {key: 100 * (len(truth) - flips(truth, given)) / len(truth) for key, given in answers.items()}
    rows = {}
    for variant in VARIANTS:
        peer = variant.peer
        rows[variant.key] = {
            "label": variant.label,
            "accuracy": accuracy[variant.key],
            "gap_points": None if peer is None else accuracy[variant.key] - accuracy[peer],
            "flips_vs_peer": None if peer is None else flips(answers[variant.key], answers[peer]),
            "flips_vs_reference": flips(answers[variant.key], answers[REFERENCE]),
            **stats[variant.key].to_dict(),
        }
    return rows


def evaluate_task(base_dir: Path, adapter_dir: Path, items: list[EncodedItem], pad_id: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="fidelity-") as scratch:
        ws = Workspace(base_dir, adapter_dir, Path(scratch))
        models = {v.key: v.build(ws, v.dtype) for v in VARIANTS}
    answers, stats = score_all(models, items, pad_id, batch_size)
    del models
    gc.collect()
    return {"items": len(items), "variants": variant_rows(items, answers, stats)}


def task_items(tokenizer, task_name: str, count: int) -> list[EncodedItem]:
    from merger.train.tasks import DEMO_TASKS

    return [encode_item(tokenizer, example) for example in DEMO_TASKS[task_name].examples("eval", count)]


def run(args: argparse.Namespace) -> dict:
    from merger.demo import build_demo_model
    from merger.probes import load_tokenizer
    from merger.train.tasks import build_demo_adapters
    from service.settings import Settings

    cache_dir = Settings().cache_dir
    base_dir = build_demo_model(cache_dir)
    adapters = build_demo_adapters(cache_dir, base_dir)
    tokenizer = load_tokenizer(base_dir)
    record = {
        "machine": machine_info(),
        "command": args.command,
        "items_per_task": args.items,
        "torch_threads": torch.get_num_threads(),
        "tasks": {},
    }
    start = time.perf_counter()
    for task in args.tasks:
        items = task_items(tokenizer, task, args.items)
        record["tasks"][task] = evaluate_task(base_dir, adapters[task], items, pad_token_id(tokenizer), args.batch_size)
        print(summary_lines(task, record["tasks"][task]), flush=True)
    record["seconds"] = time.perf_counter() - start
    record["load_average_end"] = machine_info()["load_average"]
    return record


def summary_lines(task: str, result: dict) -> str:
    lines = [f"{task} ({result['items']} items)"]
    for key, row in result["variants"].items():
        gap = "" if row["gap_points"] is None else f"  gap {row['gap_points']:+.2f} pts ({row['flips_vs_peer']} flips)"
        lines.append(
            f"  {key:14s} acc {row['accuracy']:6.2f}%{gap}  max|Δlogit| {row['max_abs_logit_diff']:.3e}"
            f"  KL {row['mean_kl']:.2e}  top-1 {row['top1_agreement']:.2%}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from merger.train.tasks import DEMO_TASKS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=128, help="held-out items per task")
    parser.add_argument("--batch-size", type=int, default=8, help="items scored per forward pass")
    parser.add_argument("--tasks", default=",".join(DEMO_TASKS), help="comma-separated demo tasks")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "fidelity.json", help="where the result goes")
    args = parser.parse_args(argv)
    require_positive(parser, args, ("items", "batch_size", "threads"))
    args.tasks = pick(parser, "--tasks", args.tasks, DEMO_TASKS)
    args.command = command_line("benchmarks.fidelity", argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    write_atomic(args.json, json.dumps(run(args), indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
