"""Training cost and stability: D²-LoRA vs PEFT LoRA (r and 2r) vs PEFT DoRA on SmolLM2-135M.

Step time: one optimiser step (forward, backward, clip, AdamW) on the same
random batch for every method, at each sequence length.  All four models are
held in memory and stepped in interleaved rounds (the method order rotates every
round); the table shows the median wall and CPU seconds per step and the median
of the per-round ratio to LoRA r (CPU time is the steadier number on a shared
machine).  Rounds repeat until --budget-s is spent (at least one).

Volatility: each of D²-LoRA / LoRA / DoRA (rank r) is trained from the same
start on the same demo-task batches; volatility is the standard deviation of
the step-to-step change of the training loss (the paper reports 36% lower for
D²-LoRA than LoRA over full runs; this is a short run).

    python -m benchmarks.train_step [--parts step-time,volatility] [--lengths 128,512,1024] [--budget-s 420]
        [--volatility-steps 24]

Writes benchmarks/results/train_step.json and train_volatility.json (each part its own).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import command_line, machine_load, markdown_table, pick
from merger.demo import demo_model_dir
from merger.fs import write_atomic
from merger.train.config import TrainConfig
from merger.train.data import batches, collate, load_examples
from merger.train.loop import Trainer, load_model, load_tokenizer, loss_volatility
from merger.train.methods import METHODS
from merger.train.tasks import DEMO_TASKS, TRAIN_SIZE, write_jsonl
from service.settings import get_settings

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    method: str
    r: int


def variants(r: int) -> list[Variant]:
    return [
        Variant(f"D²-LoRA r={r}", "d2lora", r),
        Variant(f"LoRA r={r}", "lora", r),
        Variant(f"LoRA r={2 * r} (matched params)", "lora", 2 * r),
        Variant(f"DoRA r={r} (PEFT)", "dora", r),
    ]


def make_trainer(base: Path, variant: Variant, lr: float, total_steps: int, seed: int) -> Trainer:
    config = TrainConfig(method=variant.method, r=variant.r, lora_alpha=2 * variant.r, lr=lr, seed=seed)
    torch.manual_seed(seed)
    model = METHODS[variant.method]().attach(load_model(base), config)
    return Trainer(model, config, total_steps)


def random_batch(vocab: int, batch_size: int, length: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch_size, length), generator=torch.Generator().manual_seed(length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def timed_step(trainer: Trainer, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one optimiser step."""
    cpu = time.process_time()
    _, _, wall = trainer.step(batch)
    return wall, time.process_time() - cpu


def time_steps(base: Path, args) -> dict:
    """{length: {label: [(wall, cpu), ...]}} over interleaved rounds."""
    chosen = variants(args.r)
    trainers = {v.label: make_trainer(base, v, 1e-4, 10_000, args.seed) for v in chosen}
    vocab = trainers[chosen[0].label].model.get_input_embeddings().weight.shape[0]
    inputs = {n: random_batch(vocab, args.batch_size, n) for n in args.lengths}
    for trainer in trainers.values():  # warm-up: allocator, kernels, optimiser state
        timed_step(trainer, inputs[min(args.lengths)])
    samples = {n: {v.label: [] for v in chosen} for n in args.lengths}
    deadline, rounds = time.monotonic() + args.budget_s, 0
    while rounds < args.max_rounds and (rounds == 0 or time.monotonic() < deadline):
        order = chosen[rounds % len(chosen) :] + chosen[: rounds % len(chosen)]
        for n in args.lengths:
            for v in order:
                samples[n][v.label].append(timed_step(trainers[v.label], inputs[n]))
        rounds += 1
        print(f"round {rounds} done ({machine_load()})", flush=True)
    return samples


def step_rows(samples: dict, reference: str) -> list[dict]:
    rows = []
    for n, per_label in samples.items():
        ref = per_label[reference]
        for label, runs in per_label.items():
            rows.append(
                {
                    "tokens": n,
                    "method": label,
                    "wall_s": statistics.median(w for w, _ in runs),
                    "cpu_s": statistics.median(c for _, c in runs),
                    "cpu_ratio": statistics.median(c / rc for (_, c), (_, rc) in zip(runs, ref, strict=True)),
                    "wall_ratio": statistics.median(w / rw for (w, _), (rw, _) in zip(runs, ref, strict=True)),
                    "rounds": len(runs),
                }
            )
    return rows


def task_batches(base: Path, task: str, batch_size: int, steps: int, seed: int) -> list[dict[str, torch.Tensor]]:
    tokenizer = load_tokenizer(base)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_jsonl(
            Path(tmp) / "train.jsonl", [e.to_record() for e in DEMO_TASKS[task].examples("train", TRAIN_SIZE)]
        )
        examples = load_examples(path, tokenizer, max_length=256)
    planned = [b for epoch in range(steps) for b in batches(examples, batch_size, seed, epoch)][:steps]
    return [collate(b, tokenizer.pad_token_id) for b in planned]


def volatility_rows(args) -> list[dict]:
    base = args.base
    data = task_batches(base, args.task, args.volatility_batch, args.volatility_steps, args.seed)
    rows = []
    for v in [x for x in variants(args.r) if x.r == args.r]:
        trainer = make_trainer(base, v, args.lr, len(data), args.seed)
        losses = [trainer.step(batch)[0] for batch in data]
        rows.append(
            {
                "method": v.label,
                "volatility": loss_volatility(losses),
                "first_loss": losses[0],
                "final_loss": losses[-1],
                "steps": len(losses),
            }
        )
        print(f"volatility {v.label}: {rows[-1]['volatility']:.4f}", flush=True)
    return rows


def render_step_time(step: list[dict], args) -> str:
    table = markdown_table(
        ["tokens/step", "method", "wall s/step", "CPU s/step", "× LoRA r (CPU)", "× LoRA r (wall)", "rounds"],
        [
            (
                f"{args.batch_size}×{r['tokens']}",
                r["method"],
                f"{r['wall_s']:.2f}",
                f"{r['cpu_s']:.2f}",
                f"{r['cpu_ratio']:.2f}",
                f"{r['wall_ratio']:.2f}",
                r["rounds"],
            )
            for r in step
        ],
    )
    return f"### Step time, {args.base.name} fp32, one optimiser step\n\n{table}\n"


def render_volatility(vol: list[dict], args) -> str:
    lora = next(r["volatility"] for r in vol if r["method"].startswith("LoRA"))
    table = markdown_table(
        ["method", "loss volatility (std of Δloss)", "vs LoRA", "first → final loss"],
        [
            (
                r["method"],
                f"{r['volatility']:.4f}",
                f"{r['volatility'] / lora - 1:+.0%}",
                f"{r['first_loss']:.3f} → {r['final_loss']:.3f}",
            )
            for r in vol
        ],
    )
    return (
        f"### Training-loss volatility, task {args.task}, {args.volatility_steps} steps of "
        f"batch {args.volatility_batch}, lr {args.lr}\n\n{table}\n"
    )


def step_time_rows(args) -> list[dict]:
    return step_rows(time_steps(args.base, args), variants(args.r)[1].label)


PARTS = {
    "step-time": (step_time_rows, render_step_time, "train_step.json"),
    "volatility": (volatility_rows, render_volatility, "train_volatility.json"),
}


def run_part(name: str, args) -> str:
    """Measure one part, write its JSON (with the command and machine load), return its table."""
    measure, render, filename = PARTS[name]
    load_before = machine_load()
    rows = measure(args)
    record = {
        "rows": rows,
        "command": command_line("benchmarks.train_step", args.argv),
        "load": f"{load_before} at start, {machine_load()} at end",
    }
    write_atomic(args.results_dir / filename, json.dumps(record, indent=2))
    return render(rows, args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=demo_model_dir(get_settings().cache_dir))
    parser.add_argument("--parts", default="step-time,volatility", help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[128, 512, 1024])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=420, help="keep adding timed rounds until this is spent")
    parser.add_argument("--max-rounds", type=int, default=5)
    parser.add_argument("--task", default="date-iso", choices=list(DEMO_TASKS))
    parser.add_argument("--volatility-steps", type=int, default=24)
    parser.add_argument("--volatility-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr of the volatility runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.argv = argv
    started = time.monotonic()
    for name in pick(parser, "--parts", args.parts, PARTS):
        print(run_part(name, args))
    print(f"({machine_load()}; {time.monotonic() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
