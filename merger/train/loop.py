"""The training loop: AdamW, warm-up then cosine/linear decay, gradient clipping.

`train` runs one method on one JSONL file and writes the adapter artifact plus
`train_log.json` (loss, wall time and tokens/s per step) atomically: into a
temporary sibling folder renamed into place only when complete.  `Trainer`
is the step itself, shared with benchmarks/train_step.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from merger.errors import D2LoraError
from merger.fs import write_atomic
from merger.merge import atomic_output_dir
from merger.train.config import TrainConfig
from merger.train.data import Example, batches, collate, load_examples
from merger.train.methods import METHODS, check_targets_exist

LOG_NAME = "train_log.json"


class TrainError(D2LoraError):
    """Training cannot start (bad base folder, existing output)."""


def cosine_decay(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


def linear_decay(progress: float) -> float:
    return 1 - progress


SCHEDULES = {"cosine": cosine_decay, "linear": linear_decay}


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return decay((step - warmup_steps) / max(1, total_steps - warmup_steps))


@dataclasses.dataclass(frozen=True)
class StepRecord:
    step: int
    epoch: int
    loss: float
    lr: float
    grad_norm: float
    seconds: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tokens_per_s": round(self.tokens_per_s, 2)}


def loss_volatility(losses: list[float]) -> float | None:
    """The standard deviation of the step-to-step loss change (None under three steps)."""
    changes = [b - a for a, b in itertools.pairwise(losses)]
    return statistics.stdev(changes) if len(changes) >= 2 else None


class Trainer:
    """One optimiser step at a time over the model's trainable parameters."""

    def __init__(self, model: nn.Module, config: TrainConfig, total_steps: int) -> None:
        self.model = model.train()
        self.config = config
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        warmup = math.ceil(config.warmup_ratio * total_steps)
        decay = SCHEDULES[config.schedule]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, total_steps, warmup, decay)
        )

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[float, float, float]:
        """Forward, backward, clip, update.  -> (loss, grad norm before clipping, seconds)"""
        start = time.perf_counter()
        loss = self.model(**batch).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), grad_norm.item(), time.perf_counter() - start


def load_tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    if not (base_dir / "config.json").is_file():
        raise TrainError(f"--base: {base_dir} is not a model folder (no config.json)")
    return AutoTokenizer.from_pretrained(base_dir)


def load_model(base_dir: Path) -> nn.Module:
    """The base model in fp32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def run_epochs(trainer: Trainer, examples: list[Example], pad_id: int, progress: bool | None) -> list[StepRecord]:
    config = trainer.config
    plan = [
        (epoch, batch)
        for epoch in range(config.epochs)
        for batch in batches(examples, config.batch_size, config.seed, epoch)
    ]
    records = []
    with tqdm(
        total=len(plan), desc=f"train {config.method}", unit="step", disable=None if progress is None else not progress
    ) as bar:
        for step, (epoch, batch) in enumerate(plan):
            inputs = collate(batch, pad_id)
            lr = float(trainer.scheduler.get_last_lr()[0])
            loss, grad_norm, seconds = trainer.step(inputs)
            records.append(StepRecord(step, epoch, loss, lr, grad_norm, seconds, int(inputs["attention_mask"].sum())))
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update()
    return records


def steps_per_run(examples: int, config: TrainConfig) -> int:
    return config.epochs * math.ceil(examples / config.batch_size)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    records: list[StepRecord]
    seconds: float

    def log(self, config: TrainConfig, examples: int) -> dict:
        losses = [r.loss for r in self.records]
        tokens = sum(r.tokens for r in self.records)
        step_seconds = sum(r.seconds for r in self.records)
        return {
            "method": config.method,
            "config": config.to_dict(),
            "examples": examples,
            "steps": [r.to_dict() for r in self.records],
            "final_loss": losses[-1],
            "loss_volatility": loss_volatility(losses),
            "tokens": tokens,
            "tokens_per_s": round(tokens / step_seconds, 2),
            "total_seconds": round(self.seconds, 3),
        }


def train(
    base_dir: str | Path,
    data_path: str | Path,
    out_dir: str | Path,
    config: TrainConfig | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Train one adapter on a JSONL file; write the artifact and train_log.json at out_dir (default TrainConfig())."""
    start = time.perf_counter()
    config = config or TrainConfig()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.exists():
        raise TrainError(f"--out: {out_dir} already exists")
    tokenizer = load_tokenizer(base_dir)
    examples = load_examples(data_path, tokenizer, config.max_length)  # bad data fails before the model loads
    check_targets_exist(base_dir, config)
    torch.manual_seed(config.seed)
    method = METHODS[config.method]()
    model = method.attach(load_model(base_dir), config)
    trainer = Trainer(model, config, steps_per_run(len(examples), config))
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    records = run_epochs(trainer, examples, pad_id, progress)
    result = TrainResult(out_dir, records, time.perf_counter() - start)
    with atomic_output_dir(out_dir) as tmp:
        method.save(model, tmp, config, base_dir.name)
        write_atomic(tmp / LOG_NAME, json.dumps(result.log(config, len(examples)), indent=2) + "\n")
    return result
