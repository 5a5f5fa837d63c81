"""`d2lora train`, `d2lora models demo-adapters` and `d2lora models demo-data`: argument parsing only."""

from __future__ import annotations

import argparse
from pathlib import Path

from merger.errors import D2LoraError
from merger.train.config import DEFAULT_TARGETS, METHOD_NAMES, SCHEDULE_NAMES, TrainConfig

DEFAULTS = TrainConfig()


def _targets(text: str) -> tuple[str, ...]:
    """'q_proj, v_proj' -> ('q_proj', 'v_proj')."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        method=args.method,
        r=args.r,
        lora_alpha=args.alpha,
        tau=args.tau,
        targets=args.targets,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        warmup_ratio=args.warmup_ratio,
        schedule=args.schedule,
        max_grad_norm=args.max_grad_norm,
        weight_decay=args.weight_decay,
    )


def run_train(args: argparse.Namespace) -> int:
    from merger.train.loop import train  # imports transformers: only when asked

    result = train(args.base, args.data, args.out, config_from_args(args))
    losses = [r.loss for r in result.records]
    print(
        f"trained {args.method} adapter in {result.seconds:.1f} s: {len(losses)} steps, "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; wrote {result.out_dir}"
    )
    return 0


def _demo_base(args: argparse.Namespace) -> Path:
    from merger.demo import demo_model_dir

    base = args.base or demo_model_dir(args.cache_dir)
    if not (base / "config.json").is_file():
        raise D2LoraError(f"--base: {base} is not a model folder; run `d2lora models demo` first")
    return base


def run_demo_adapters(args: argparse.Namespace) -> int:
    from merger.train.tasks import build_demo_adapters

    for task, path in build_demo_adapters(args.cache_dir, _demo_base(args)).items():
        print(f"{task}\t{path}")
    return 0


def run_demo_data(args: argparse.Namespace) -> int:
    from merger.train.tasks import DEMO_TASKS, write_task_data

    for task in DEMO_TASKS.values():
        for split, path in write_task_data(task, args.out or args.cache_dir / "data").items():
            print(f"{task.name}\t{split}\t{path}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a D²-LoRA (or PEFT LoRA / DoRA) adapter on a JSONL file")
    p.add_argument("--base", required=True, type=Path, help="base model folder (safetensors)")
    p.add_argument("--data", required=True, type=Path, help='JSONL: {"prompt","completion"} or {"messages"}')
    p.add_argument("--out", required=True, type=Path, help="adapter folder to write (must not exist)")
    p.add_argument("--method", default=DEFAULTS.method, choices=METHOD_NAMES)
    p.add_argument("--r", type=int, default=DEFAULTS.r, help="rank of each branch")
    p.add_argument("--alpha", type=float, default=DEFAULTS.lora_alpha, help="lora_alpha (scaling alpha / r)")
    p.add_argument("--tau", type=float, default=DEFAULTS.tau, help="weight of the negative branch (d2lora)")
    p.add_argument("--targets", type=_targets, default=DEFAULT_TARGETS, help="comma list of module names")
    p.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak learning rate (AdamW)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--max-length", type=int, default=DEFAULTS.max_length, help="longest example, in tokens")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--warmup-ratio", type=float, default=DEFAULTS.warmup_ratio)
    p.add_argument("--schedule", default=DEFAULTS.schedule, choices=SCHEDULE_NAMES, help="decay after warm-up")
    p.add_argument("--max-grad-norm", type=float, default=DEFAULTS.max_grad_norm, help="gradient clipping")
    p.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    p.set_defaults(func=run_train)


def add_demo_parsers(models_subparsers, cache_dir: Path) -> None:
    """The demo sub-commands of `d2lora models`."""
    adapters = models_subparsers.add_parser("demo-adapters", help="train the demo tasks' D²-LoRA adapters (once)")
    adapters.add_argument("--cache-dir", type=Path, default=cache_dir)
    adapters.add_argument("--base", type=Path, help="base model folder (default: the demo model in the cache)")
    adapters.set_defaults(func=run_demo_adapters)
    data = models_subparsers.add_parser("demo-data", help="write the demo tasks' train/eval JSONL files")
    data.add_argument("--cache-dir", type=Path, default=cache_dir)
    data.add_argument("--out", type=Path, help="output folder (default: CACHE_DIR/data)")
    data.set_defaults(func=run_demo_data)
