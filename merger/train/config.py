"""The options of one training run, validated on construction (every error names the field)."""

from __future__ import annotations

import dataclasses
import math

from merger.errors import D2LoraError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
METHOD_NAMES = ("d2lora", "lora", "dora")
SCHEDULE_NAMES = ("cosine", "linear")


class TrainConfigError(D2LoraError):
    """A training option is out of range."""


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TrainConfigError(f"{name}: must be a positive integer, got {value!r}")


def _finite(name: str, value, low: float, low_inclusive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= low if low_inclusive else value > low)
    if not ok:
        raise TrainConfigError(f"{name}: must be a finite number {'>=' if low_inclusive else '>'} {low}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    method: str = "d2lora"
    r: int = 8
    lora_alpha: float = 16.0
    tau: float = 0.5
    targets: tuple[str, ...] = DEFAULT_TARGETS
    epochs: int = 2
    lr: float = 2e-4
    batch_size: int = 8
    max_length: int = 512
    seed: int = 0
    warmup_ratio: float = 0.1
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHOD_NAMES:
            raise TrainConfigError(f"method: {self.method!r} is not one of {', '.join(METHOD_NAMES)}")
        if self.schedule not in SCHEDULE_NAMES:
            raise TrainConfigError(f"schedule: {self.schedule!r} is not one of {', '.join(SCHEDULE_NAMES)}")
        for name in ("r", "epochs", "batch_size", "max_length"):
            _positive_int(name, getattr(self, name))
        if not self.targets or not all(isinstance(t, str) and t.strip() for t in self.targets):
            raise TrainConfigError(f"targets: must be a non-empty list of module names, got {list(self.targets)!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise TrainConfigError(f"seed: must be an integer >= 0, got {self.seed!r}")
        self._check_numbers()

    def _check_numbers(self) -> None:
        _finite("lora_alpha", self.lora_alpha, 0, low_inclusive=False)
        _finite("tau", self.tau, 0)
        _finite("lr", self.lr, 0, low_inclusive=False)
        _finite("warmup_ratio", self.warmup_ratio, 0)
        if self.warmup_ratio >= 1:
            raise TrainConfigError(f"warmup_ratio: must be below 1, got {self.warmup_ratio!r}")
        _finite("max_grad_norm", self.max_grad_norm, 0, low_inclusive=False)
        _finite("weight_decay", self.weight_decay, 0)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}
