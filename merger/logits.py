"""The logit metrics of `d2lora verify` (merger.report defines them), a block of positions at a time.

Over a vocabulary of 128k (Llama 3's) a model's float32 logits are 0.5 MiB per position, so the
probes' ~500 positions would hold ~500 MiB for a pair at once; a `LogitTally` takes them a block of
positions at a time and keeps only maxima, sums and each position's top-1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from merger.report import LogitMetrics

POSITION_BLOCK = 16  # the KL's float64 temporaries go this many positions at a time: (positions, vocab)


def first_divergence(reference: torch.Tensor, merged: torch.Tensor) -> list[int | None]:
    """Per probe, the index of the first differing greedy token, or None.  (probes, new) -> [probes]"""
    differs = reference != merged  # (probes, new)
    return [int(row.nonzero()[0]) if bool(row.any()) else None for row in differs]


def kl_sum(reference: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """Sum over positions of KL(p_ref ‖ p_merged), float64.  (positions, vocab) -> ()"""
    total = torch.zeros((), dtype=torch.float64)
    for ref, other in zip(reference.split(POSITION_BLOCK), merged.split(POSITION_BLOCK), strict=True):
        log_ref = torch.log_softmax(ref.double(), dim=-1)
        log_merged = torch.log_softmax(other.double(), dim=-1)
        total += (log_ref.exp() * (log_ref - log_merged)).sum()
    return total


def mean_kl(reference: torch.Tensor, merged: torch.Tensor) -> float:
    """Mean over positions of KL(p_ref ‖ p_merged), float64.  (positions, vocab) -> float"""
    return float(kl_sum(reference, merged) / reference.shape[0])


@dataclasses.dataclass
class LogitTally:
    """The maxima and sums the logit metrics are made of, added a block of positions at a time."""

    worst: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))  # torch.maximum keeps a NaN
    largest: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))
    kl: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    agreeing: int = 0
    reference_top1: list[torch.Tensor] = dataclasses.field(default_factory=list)  # [(block,)]

    def add(self, reference: torch.Tensor, merged: torch.Tensor) -> None:
        """reference, merged: (block, vocab) float32 logits at the same positions."""
        self.worst = torch.maximum(self.worst, (merged - reference).abs().max())
        self.largest = torch.maximum(self.largest, reference.abs().max())
        top1 = reference.argmax(-1)  # (block,)
        self.agreeing += int((merged.argmax(-1) == top1).sum())
        self.kl += kl_sum(reference, merged)
        self.reference_top1.append(top1)

    @property
    def positions(self) -> int:
        return sum(t.shape[0] for t in self.reference_top1)

    def top1(self) -> torch.Tensor:
        """The reference's argmax at every position added so far.  -> (positions,)"""
        return torch.cat(self.reference_top1)

    def metrics(self, divergence: Sequence[int | None], new_tokens: int) -> LogitMetrics:
        """divergence: first_divergence per probe."""
        agreed = sum(new_tokens if d is None else d for d in divergence)
        return LogitMetrics(
            positions=self.positions,
            max_abs_logit_diff=self.worst.item(),
            relative_logit_error=(self.worst / self.largest).item(),
            mean_kl=float(self.kl / self.positions),
            top1_agreement=self.agreeing / self.positions,
            greedy_agreement=agreed / (len(divergence) * new_tokens),
            greedy_first_divergence=tuple(divergence),
        )


def logit_metrics(
    reference: torch.Tensor, merged: torch.Tensor, divergence: Sequence[int | None], new_tokens: int
) -> LogitMetrics:
    """reference, merged: (positions, vocab) float32 on the same inputs, whole."""
    tally = LogitTally()
    for ref, other in zip(reference.split(POSITION_BLOCK), merged.split(POSITION_BLOCK), strict=True):
        tally.add(ref, other)
    return tally.metrics(divergence, new_tokens)
