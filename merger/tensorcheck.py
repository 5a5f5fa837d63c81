"""The tensor checks of `d2lora verify`, a few tensors at a time.

Adapted weights are compared with Ŵ recomputed in float64 (the unmerged forward's combination of
W0's rows and ΔW's rows from the low-rank factors, a block of output rows at a time, so no (out, in)
float64 tensor is ever formed and neither weight is ever wholly resident); every other tensor must
equal the base's cast to the merged dtype.  The tensors come from a
merger.streamed_modules.TensorPool, so the checks read a layer's tensors while the probes' forward has
them mapped.  Metric definitions are in merger.report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import torch

from merger import formula
from merger.checkpoint import MappedTensor, StoredTensor
from merger.kinds import AdapterKind, ModuleAdapter, out_in
from merger.report import WeightError
from merger.streamed_modules import TensorPool

BLOCK_ELEMENTS = 1 << 20  # float64 work per block: 8 MiB


def _is_worse(value: float, worst: float) -> bool:
    """Whether an error exceeds the worst so far, NaN exceeding everything (a NaN weight must fail the check)."""
    return not math.isnan(worst) and (math.isnan(value) or value > worst)


def _worse(worst: float, value: float) -> float:
    return value if _is_worse(value, worst) else worst


def effective_weight_rows(
    w0: torch.Tensor, kind: AdapterKind, module: ModuleAdapter
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Ŵ in float64, a block of output rows at a time, by the unmerged forward's own combination.

    Per block (AdapterKind.row_blocks: W0's rows and their row scale), ΔW's rows are formed in float64
    from the kind's low-rank factors (s · B[rows] A, not the merge's float32 ΔW) and combined with W0's
    rows by formula.combine_outputs, the reference forward's formula.  w0: (out, in) -> (rows, (rows, in))
    """
    a, b = (factor.to(torch.float64) for factor in kind.low_rank(module))  # (k, in), (out, k)
    for rows, w0_rows, _, scale in kind.row_blocks(w0, module):
        delta_t = (module.scaling * (b[rows] @ a)).T  # (in, rows) = ΔW[rows]ᵀ
        expected_t = formula.combine_outputs(w0_rows.T.to(torch.float64), delta_t, scale, kind.add_residual)
        yield rows, expected_t.T


def module_error(
    w0_mapped: MappedTensor, merged_mapped: MappedTensor, kind: AdapterKind, module: ModuleAdapter
) -> WeightError:
    """max |W_merged − Ŵ| and that over max |Ŵ|, for one adapted module.

    Both weights are read a block of rows at a time and each block's pages given back, so a module costs a
    block of each, not its two whole (out, in) weights (a transposed Conv1D weight's rows are columns of
    its file: its pages are given back by the caller).
    """
    w0, merged = out_in(w0_mapped.view, module), out_in(merged_mapped.view, module)  # (out, in) each
    if merged.shape != w0.shape:
        return WeightError(float("inf"), float("inf"))
    worst = largest = 0.0
    for rows, expected in effective_weight_rows(w0, kind, module):
        actual = merged[rows].to(torch.float64)  # (rows, in)
        worst = _worse(worst, (actual - expected).abs().max().item())
        largest = _worse(largest, expected.abs().max().item())
        if not module.fan_in_fan_out:
            w0_mapped.drop_rows(rows)
            merged_mapped.drop_rows(rows)
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
                error = module_error(self.pool.mapped(base), self.pool.mapped(merged), self.kind, module)
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

    def sorted_weight_errors(self) -> dict[str, WeightError]:
        return dict(sorted(self.weight_errors.items()))
