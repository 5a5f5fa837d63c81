"""The equivalence report of `d2lora verify` and the thresholds it is judged by.

Metric definitions (the reference is the unmerged adapter in float32; the
merged model runs in the dtype its checkpoint holds; "positions" are every
non-pad token position of the eight probes, prompt plus the merged model's 32
greedy tokens, teacher-forced in both models):

- max_abs_logit_diff    max over positions and vocabulary of |z_merged − z_ref|
- relative_logit_error  max_abs_logit_diff / max |z_ref|  (same positions and vocabulary)
- mean_kl               mean over positions of KL(softmax z_ref ‖ softmax z_merged), nats, float64
- top1_agreement        fraction of positions where argmax z_merged == argmax z_ref
- greedy_agreement      each model decoding 32 tokens greedily from each probe on its own, a probe
                        scores the number of tokens before their first divergence (32 when none), and
                        greedy_agreement = the sum over probes / (probes × 32).  Tokens after a
                        divergence are not compared: they follow different prefixes.  Only the merged
                        model decodes: the reference's top-1 along that path is its own greedy choice
                        up to the first step where it differs from the path, which is that divergence.
- weight error          per adapted module, max |W_merged − Ŵ| where Ŵ is recomputed in float64
                        from the base tensor and the factors; "relative" divides by max |Ŵ|
- max_untouched_abs_diff  max |W_merged − W0 cast to the merged dtype| over every other tensor
- top1_drop_vs_base     reduced precision only: how far top1_agreement falls below the base model's
                        own top-1 agreement between float32 and the merged dtype (the "dtype floor",
                        the same metrics for the base without adapter, fp32 vs that dtype).  A bf16
                        model disagrees with its fp32 self at near-tied positions whatever the merge
                        (SmolLM2-135M: 96.9% top-1), so the merge is judged by what it adds to that.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from merger.errors import D2LoraError
from merger.fs import write_atomic


class ThresholdError(D2LoraError):
    """A threshold value is out of range."""


AGREEMENT_FIELDS = ("min_top1_agreement", "min_greedy_agreement", "max_top1_drop_vs_base")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Pass limits; None means the metric is reported but not judged."""

    max_relative_logit_error: float | None = None
    min_top1_agreement: float | None = None
    min_greedy_agreement: float | None = None
    max_relative_weight_error: float | None = None
    max_untouched_abs_diff: float | None = 0.0
    max_top1_drop_vs_base: float | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ThresholdError(f"{field.name}: must be a finite number or None, got {value!r}")
            if value < 0 or (field.name in AGREEMENT_FIELDS and value > 1):
                upper = "1" if field.name in AGREEMENT_FIELDS else "inf"
                raise ThresholdError(f"{field.name}: must be in [0, {upper}], got {value!r}")

    @classmethod
    def for_dtype(cls, dtype: torch.dtype) -> Thresholds:
        try:
            return DEFAULT_THRESHOLDS[dtype]
        except KeyError:
            raise ThresholdError(f"no default thresholds for merged dtype {dtype}") from None

    def to_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)


# Weight limits are ~2× the dtype's unit roundoff relative to the module's largest entry;
# fp32 also allows the rounding of the fp32 computation itself.
DEFAULT_THRESHOLDS = {
    torch.float32: Thresholds(max_relative_logit_error=1e-4, min_greedy_agreement=1.0, max_relative_weight_error=1e-5),
    torch.bfloat16: Thresholds(max_top1_drop_vs_base=0.02, max_relative_weight_error=2**-7),
    torch.float16: Thresholds(max_top1_drop_vs_base=0.02, max_relative_weight_error=2**-10),
}


@dataclasses.dataclass(frozen=True)
class Check:
    """One threshold: the metric it limits, and how the two compare when it passes."""

    threshold: str
    metric: str
    passes: Callable[[float, float], bool]
    symbol: str


CHECKS = (
    Check("max_relative_logit_error", "relative_logit_error", operator.le, "<="),
    Check("min_top1_agreement", "top1_agreement", operator.ge, ">="),
    Check("min_greedy_agreement", "greedy_agreement", operator.ge, ">="),
    Check("max_relative_weight_error", "max_relative_weight_error", operator.le, "<="),
    Check("max_untouched_abs_diff", "max_untouched_abs_diff", operator.le, "<="),
    Check("max_top1_drop_vs_base", "top1_drop_vs_base", operator.le, "<="),
)


@dataclasses.dataclass(frozen=True)
class WeightError:
    max_abs: float
    relative: float


@dataclasses.dataclass(frozen=True)
class LogitMetrics:
    positions: int
    max_abs_logit_diff: float
    relative_logit_error: float
    mean_kl: float
    top1_agreement: float
    greedy_agreement: float
    greedy_first_divergence: tuple[int | None, ...]  # per probe; None when all tokens agree


@dataclasses.dataclass(frozen=True)
class EquivalenceReport:
    base: str
    adapter: str
    merged: str | None  # None when verify merged into a temporary folder
    kind: str
    reference_dtype: str
    merged_dtype: str
    probes: int
    new_tokens: int
    logits: LogitMetrics
    weight_errors: dict[str, WeightError]
    max_untouched_abs_diff: float
    tensor_name_problems: tuple[str, ...]
    thresholds: Thresholds
    seconds: float
    dtype_floor: LogitMetrics | None = None  # the base without adapter, float32 vs the merged dtype
    worst_untouched: str | None = None  # the untouched tensor with the largest |Δ| (None: every one is equal)
    failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures

    def metric(self, name: str) -> float:
        if name == "max_relative_weight_error":
            return max((e.relative for e in self.weight_errors.values()), default=0.0)
        if name == "max_untouched_abs_diff":
            return self.max_untouched_abs_diff
        if name == "top1_drop_vs_base":
            return 0.0 if self.dtype_floor is None else self.dtype_floor.top1_agreement - self.logits.top1_agreement
        return getattr(self.logits, name)

    def where(self, name: str) -> str | None:
        """The tensor or module a weight metric's value comes from."""
        if name == "max_relative_weight_error":
            worst = self.worst_module()
            return None if worst is None else worst[0]
        return self.worst_untouched if name == "max_untouched_abs_diff" else None

    def judged(self) -> EquivalenceReport:
        """A copy with `failures` filled in from the thresholds."""
        failures = list(self.tensor_name_problems)
        for check in CHECKS:
            limit = getattr(self.thresholds, check.threshold)
            value = self.metric(check.metric)
            if limit is not None and not (math.isfinite(value) and check.passes(value, limit)):
                where = self.where(check.metric)
                at = f" in {where}" if where else ""
                failures.append(f"{check.metric} = {value:.6g}{at}, required {check.symbol} {limit:.6g}")
        return dataclasses.replace(self, failures=tuple(failures))

    def worst_module(self) -> tuple[str, WeightError] | None:
        if not self.weight_errors:
            return None
        return max(self.weight_errors.items(), key=lambda item: item[1].relative)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["weight_errors"] = {k: dataclasses.asdict(v) for k, v in self.weight_errors.items()}
        out["tensor_name_problems"] = list(self.tensor_name_problems)
        out["failures"] = list(self.failures)
        out["passed"] = self.passed
        return out

    def write_json(self, path: str | Path) -> None:
        """Write to_dict() as JSON atomically (merger.fs)."""
        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        lines = [
            f"equivalence: {'PASSED' if self.passed else 'FAILED'}  ({self.kind}, {self.seconds:.1f} s)",
            f"  base {self.base}  adapter {self.adapter}  merged {self.merged or '(temporary)'}",
            f"  reference unmerged {self.reference_dtype}  vs  merged {self.merged_dtype}",
            *self._logit_lines(),
            *self._weight_lines(),
            f"  thresholds: {', '.join(f'{k}={v:g}' for k, v in self.thresholds.to_dict().items() if v is not None)}",
        ]
        lines += [f"  FAIL: {reason}" for reason in self.failures]
        return "\n".join(lines)

    def _logit_lines(self) -> list[str]:
        m = self.logits
        diverged = sum(d is not None for d in m.greedy_first_divergence)
        return [
            f"  probes {self.probes} x {self.new_tokens} greedy tokens, {m.positions} teacher-forced positions",
            f"  max |Δlogit| {m.max_abs_logit_diff:.3e}   relative {m.relative_logit_error:.3e}   "
            f"mean KL {m.mean_kl:.3e}",
            f"  top-1 agreement {m.top1_agreement:.2%}   greedy agreement {m.greedy_agreement:.2%} "
            f"({diverged} of {self.probes} probes diverged)",
            *self._floor_lines(),
        ]

    def _floor_lines(self) -> list[str]:
        if self.dtype_floor is None:
            return []
        f = self.dtype_floor
        return [
            f"  dtype floor, base alone float32 vs {self.merged_dtype}: top-1 {f.top1_agreement:.2%}   "
            f"max |Δlogit| {f.max_abs_logit_diff:.3e}   mean KL {f.mean_kl:.3e}   "
            f"top-1 drop vs base {self.metric('top1_drop_vs_base'):+.2%}"
        ]

    def _weight_lines(self) -> list[str]:
        worst = self.worst_module()
        worst_untouched = f" ({self.worst_untouched})" if self.worst_untouched else ""
        lines = [
            f"  weights: {len(self.weight_errors)} adapted modules, "
            f"untouched tensors max |Δ| {self.max_untouched_abs_diff:.3e}{worst_untouched}"
        ]
        if worst is not None:
            name, err = worst
            lines.append(f"  worst module {name}: max |Δ| {err.max_abs:.3e}  relative {err.relative:.3e}")
        return lines
