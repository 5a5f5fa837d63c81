"""Grouped multi-adapter LoRA ops on plain tensors (no vLLM imports): what the CPU punica wrapper runs.

vLLM's CPU ops gather every token's own copy of its adapter's weights, a
(tokens, out, r) tensor per module per step.  Here the tokens of one step are
sorted by adapter slot once (`plan_step`), and each op is one grouped matmul
over the stacked slot weights (`torch._grouped_mm`: one GEMM per slot present,
in one call; absent slots are empty groups and cost nothing), so every
present adapter's weights are read once and nothing is copied per token.
Tokens without an adapter (slot −1) are in no group: they get exactly the
base output, and the row-scale table maps them to its last row, all ones.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Which adapter slot each token of one forward step uses, laid out for the grouped matmuls."""

    present: frozenset[int]  # slots with at least one token in this step
    order: torch.Tensor | None  # (n,) adapter tokens sorted by slot; None when they already are tokens 0..n-1
    offsets: torch.Tensor  # (slots,) int32: end of each slot's rows in that order (cumulative counts)
    num_adapter_tokens: int  # n
    scale_index: torch.Tensor  # (tokens,) row of the row-scale table per token: its slot, or `slots` for the base

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter tokens' rows of x in slot order.  x: (tokens, f) -> (n, f)"""
        return x[: self.num_adapter_tokens] if self.order is None else x.index_select(0, self.order)

    def add_rows(self, y: torch.Tensor, delta: torch.Tensor) -> None:
        """y[adapter tokens] += delta, delta in slot order.  y: (tokens, f), delta: (n, f)"""
        if self.order is None:
            y[: self.num_adapter_tokens] += delta
        else:
            y.index_add_(0, self.order, delta)


def plan_step(token_slots: torch.Tensor, num_slots: int) -> StepPlan | None:
    """The plan of a step whose token i uses slot token_slots[i] (−1: no adapter); None when no token has one.

    token_slots: (tokens,) int64.
    """
    key = torch.where(token_slots >= 0, token_slots, num_slots)  # (tokens,): the base sorts last
    counts = torch.bincount(key, minlength=num_slots + 1)[:num_slots]  # (slots,)
    total = int(counts.sum())
    if total == 0:
        return None
    order = torch.sort(key, stable=True).indices[:total]  # (n,)
    in_place = bool(torch.equal(order, torch.arange(total, device=order.device)))
    return StepPlan(
        present=frozenset(counts.nonzero().flatten().tolist()),
        order=None if in_place else order,
        offsets=counts.cumsum(0).to(torch.int32),
        num_adapter_tokens=total,
        scale_index=key,
    )


def grouped_matmul(x: torch.Tensor, weights: torch.Tensor, plan: StepPlan) -> torch.Tensor:
    """Row block g of x (slot order) times weights[g] for every slot g.  x: (n, i), weights: (slots, i, o) -> (n, o)"""
    return torch._grouped_mm(x, weights.to(x.dtype), offs=plan.offsets)


def add_grouped_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: tuple[torch.Tensor, ...],
    lora_b: tuple[torch.Tensor, ...],
    plan: StepPlan,
) -> None:
    """y[t, slice j] += B_j[s] (A_j[s] x[t]) for every adapter token t of slot s, slice by slice (vLLM's layout).

    y: (tokens, Σ out_j); x: (tokens, in); lora_a[j]: (slots, 1, k, in); lora_b[j]: (slots, 1, out_j, k).
    """
    rows = plan.rows(x)  # (n, in)
    deltas = [
        grouped_matmul(grouped_matmul(rows, a.squeeze(1).transpose(1, 2), plan), b.squeeze(1).transpose(1, 2), plan)
        for a, b in zip(lora_a, lora_b, strict=True)
    ]  # [(n, out_j)]
    plan.add_rows(y, deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=1))


def scale_rows(y: torch.Tensor, row_scale: torch.Tensor, plan: StepPlan) -> None:
    """y[t] *= row_scale[slot of t], base tokens × 1 (exact).  y: (tokens, out), row_scale: (slots + 1, out)"""
    y.mul_(row_scale.index_select(0, plan.scale_index))
