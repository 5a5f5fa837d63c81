"""The tensor checks of `d2lora verify`, a few tensors at a time.

Adapted weights are compared with Ŵ recomputed in float64 (the unmerged forward evaluated on the
identity, a block of its rows at a time, so no (out, in) float64 tensor is ever formed); every
other tensor must equal the base's cast to the merged dtype.  The tensors come from a
merger.streamed_modules.TensorPool, so the checks read a layer's tensors while the probes' forward has
them mapped.  Metric definitions are in merger.report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import torch

from merger import formula
from merger.checkpoint import MappedTensor, StoredTensor
from merger.kinds import AdapterKind, ModuleAdapter
from merger.report import WeightError
from merger.streamed_modules import TensorPool

BLOCK_ELEMENTS = 1 << 20  # float64 work per block: 8 MiB


def _is_worse(value: float, worst: float) -> bool:
    """Whether an error exceeds the worst so far, NaN exceeding everything (a NaN weight must fail the check)."""
    return not math.isnan(worst) and (math.isnan(value) or value > worst)


def _worse(worst: float, value: float) -> float:
    return value if _is_worse(value, worst) else worst


def identity_blocks(size: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """Consecutive row blocks of the float64 identity.  -> (rows, (block, size))"""
    step = max(1, BLOCK_ELEMENTS // max(1, size))
    for start in range(0, size, step):
        rows = slice(start, min(start + step, size))
        block = torch.zeros(rows.stop - start, size, dtype=torch.float64)
        block[torch.arange(rows.stop - start), torch.arange(start, rows.stop)] = 1.0
        yield rows, block


def effective_weight_blocks(
    w0_stored: torch.Tensor, kind: AdapterKind, module: ModuleAdapter
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Ŵᵀ in float64, a block of input features at a time: the unmerged forward on the identity.

    With x = rows of I, W0 x and ΔW x (the kind's low-rank branch) are exact columns of W0 and ΔW,
    so formula.combine_outputs gives rows of Ŵᵀ without the merge's code path.  -> (features, (block, out))
    """
    w0 = w0_stored.T if module.fan_in_fan_out else w0_stored  # (out, in)
    row_scale = kind.blocked_row_scale(w0, module)  # (out, 1) or None
    for features, identity in identity_blocks(w0.shape[1]):
        delta_t = kind.delta_forward(identity, module)  # (block, out) = ΔW[:, features]ᵀ
        base_t = w0[:, features].T.to(torch.float64)  # (block, out)
        yield features, formula.combine_outputs(base_t, delta_t, row_scale, kind.add_residual)


def module_error(
    w0_stored: torch.Tensor, merged_stored: torch.Tensor, kind: AdapterKind, module: ModuleAdapter
) -> WeightError:
    """max |W_merged − Ŵ| and that over max |Ŵ|, for one adapted module."""
    if merged_stored.shape != w0_stored.shape:
        return WeightError(float("inf"), float("inf"))
    merged = merged_stored.T if module.fan_in_fan_out else merged_stored  # (out, in)
    worst = largest = 0.0
    for features, expected_t in effective_weight_blocks(w0_stored, kind, module):
        actual_t = merged[:, features].T.to(torch.float64)  # (block, out)
        worst = _worse(worst, (actual_t - expected_t).abs().max().item())
        largest = _worse(largest, expected_t.abs().max().item())
    return WeightError(worst, worst / max(largest, torch.finfo(torch.float64).tiny))


def max_abs_diff(stored: MappedTensor, expected: MappedTensor) -> float:
    """max |stored − expected cast to stored's dtype| (inf if the shapes differ), in float64 a block at a time.

    Each block's pages are given back once compared, so a vocabulary-sized pair costs two blocks of memory.
    """
    if stored.view.shape != expected.view.shape:
        return float("inf")
    a, b = stored.view.reshape(-1), expected.view.reshape(-1)
    worst = 0.0
    for start in range(0, a.numel(), BLOCK_ELEMENTS):
        end = min(start + BLOCK_ELEMENTS, a.numel())
        block, expected_block = a[start:end], b[start:end].to(a.dtype)
        if not torch.equal(block, expected_block):  # equal blocks (a faithful merge: all of them) cost one compare
            diff = block.to(torch.float64) - expected_block.to(torch.float64)
            worst = _worse(worst, diff.abs().max().item())
        stored.drop_pages(start * a.element_size(), end * a.element_size())
        expected.drop_pages(start * b.element_size(), end * b.element_size())
    return worst


def tensor_name_problems(base: Mapping[str, StoredTensor], merged: Mapping[str, StoredTensor]) -> tuple[str, ...]:
    problems = []
    for label, names in (
        ("missing from", base.keys() - merged.keys()),
        ("not in the base but in", merged.keys() - base.keys()),
    ):
        if names:
            problems.append(f"{len(names)} tensors {label} the merged checkpoint, e.g. {sorted(names)[0]}")
    return tuple(problems)


class TensorChecks:
    """Every tensor check over base and merged, fed a few names at a time (`check`), the rest at the end."""

    def __init__(
        self,
        pool: TensorPool,
        base: Mapping[str, StoredTensor],
        merged: Mapping[str, StoredTensor],
        kind: AdapterKind,
        bound: list[ModuleAdapter],
    ):
        self.pool, self.base, self.merged, self.kind = pool, base, merged, kind
        self.adapted = {m.weight_key: m for m in bound}
        self.pending = set(base.keys() & merged.keys())
        self.weight_errors: dict[str, WeightError] = {}
        self.max_untouched_abs_diff = 0.0
        self.worst_untouched: str | None = None

    def check(self, names: Iterable[str]) -> None:
        for name in sorted(set(names) & self.pending):
            self.pending.discard(name)
            base, merged = self.base[name], self.merged[name]
            if name in self.adapted:
                module = self.adapted[name]
                error = module_error(self._view(base), self._view(merged), self.kind, module)
                self.weight_errors[module.path] = error
            elif merged is not base:  # the base's own bytes (a fused file over the base) need no check
                diff = max_abs_diff(self.pool.mapped(merged), self.pool.mapped(base))
                if _is_worse(diff, self.max_untouched_abs_diff):
                    self.max_untouched_abs_diff, self.worst_untouched = diff, name
            self.pool.release(base)
            self.pool.release(merged)

    def check_rest(self) -> None:
        self.check(set(self.pending))
        self.pool.close()

    def _view(self, stored: StoredTensor) -> torch.Tensor:
        return self.pool.mapped(stored).view

    def sorted_weight_errors(self) -> dict[str, WeightError]:
        return dict(sorted(self.weight_errors.items()))
