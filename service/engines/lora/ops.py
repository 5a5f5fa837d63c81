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


# Up to this many adapter tokens in a step (decode-sized), a packed layer's expand is one grouped matmul over a
# block-diagonal B̃ (its zero blocks cost little next to one op per slice); beyond it, one per slice.
BLOCK_DIAGONAL_MAX_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class FusedSlots:
    """One layer's adapter slots in the layout of the grouped matmuls; vLLM's stacked tensors are views of it.

    a: (slots, S·k, in)   the S slices' A one after another (vLLM's lora_a_stacked[j] = a[:, j·k:(j+1)·k])
    b: (slots, S·k, out)  block-diagonal: block j is B̃_jᵀ at rows j·k:(j+1)·k, columns of slice j
    """

    a: torch.Tensor
    b: torch.Tensor
    rank: int  # k, vLLM's max_lora_rank
    output_slices: tuple[int, ...]

    @classmethod
    def adopt(cls, lora_a: tuple[torch.Tensor, ...], lora_b: tuple[torch.Tensor, ...], output_slices: tuple[int, ...]):
        """Fused storage holding the current contents of vLLM's stacked tensors, and views of it to replace them.

        lora_a[j]: (slots, 1, k, in), lora_b[j]: (slots, 1, out_j, k) -> (FusedSlots, lora_a views, lora_b views)
        """
        slots, _, rank, features = lora_a[0].shape
        a = torch.zeros(slots, rank * len(lora_a), features, dtype=lora_a[0].dtype, device=lora_a[0].device)
        b = torch.zeros(slots, rank * len(lora_a), sum(output_slices), dtype=lora_b[0].dtype, device=a.device)
        fused = cls(a, b, rank, tuple(output_slices))
        a_views, b_views = fused.views()
        for view, old in zip((*a_views, *b_views), (*lora_a, *lora_b), strict=True):
            view.copy_(old)
        return fused, a_views, b_views

    def views(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """vLLM's layout as views: ((slots, 1, k, in) per slice, (slots, 1, out_j, k) per slice)."""
        a_views, b_views, start = [], [], 0
        for j, size in enumerate(self.output_slices):
            ranks = slice(j * self.rank, (j + 1) * self.rank)
            a_views.append(self.a[:, ranks].unsqueeze(1))
            b_views.append(self.b[:, ranks, start : start + size].transpose(1, 2).unsqueeze(1))
            start += size
        return tuple(a_views), tuple(b_views)

    def add(self, y: torch.Tensor, x: torch.Tensor, plan: StepPlan) -> None:
        """y[t] += B̃[s] (A[s] x[t]) for every adapter token t of slot s.  y: (tokens, out), x: (tokens, in)"""
        rows = plan.rows(x)  # (n, in)
        h = grouped_matmul(rows, self.a.transpose(1, 2), plan)  # (n, S·k): every slice's A x in one product
        if len(self.output_slices) == 1 or plan.num_adapter_tokens <= BLOCK_DIAGONAL_MAX_TOKENS:
            plan.add_rows(y, grouped_matmul(h, self.b, plan))  # (n, out)
            return
        parts, start = [], 0
        for j, size in enumerate(self.output_slices):
            ranks = slice(j * self.rank, (j + 1) * self.rank)
            parts.append(grouped_matmul(h[:, ranks], self.b[:, ranks, start : start + size], plan))  # (n, out_j)
            start += size
        plan.add_rows(y, torch.cat(parts, dim=1))


def scale_rows(y: torch.Tensor, row_scale: torch.Tensor, plan: StepPlan) -> None:
    """y[t] *= row_scale[slot of t], base tokens × 1 (exact).  y: (tokens, out), row_scale: (slots + 1, out)"""
    y.mul_(row_scale.index_select(0, plan.scale_index))
