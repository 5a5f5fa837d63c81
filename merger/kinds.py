"""Adapter kinds as a registry of small strategy classes.

A kind knows which factor tensors a module carries, their shapes, and how they
turn into ΔW and the per-row scale of merger.formula. It knows nothing of files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F

from merger import formula
from merger.config import AdapterConfig, AdapterConfigError

Factors = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class ModuleAdapter:
    """One adapted module: its path in the base model, its factors and scaling."""

    path: str  # e.g. "model.layers.0.self_attn.q_proj"
    factors: Factors
    scaling: float
    tau: float
    fan_in_fan_out: bool

    @property
    def weight_key(self) -> str:
        return f"{self.path}.weight"


@dataclasses.dataclass(frozen=True)
class RowScaledLowRank:
    """One module in its per-request form (SPEC §1): Ŵ x = d ⊙ (W0 x) + B̃ (A x), all fp32."""

    a: torch.Tensor  # (k, in)
    b: torch.Tensor  # (out, k): B̃ = diag(d + c)·s·B
    row_scale: torch.Tensor | None  # (out,): d; None where d = 1 (plain LoRA)


@dataclasses.dataclass(frozen=True)
class DoraFactors:
    """One module as an exact PEFT DoRA adapter of rank k with scaling 1, all fp32."""

    a: torch.Tensor  # (k, in): lora_A
    b: torch.Tensor  # (out, k): lora_B = diag((d + c)/d)·s·B
    magnitude: torch.Tensor  # (out,): lora_magnitude_vector = d ⊙ ‖W0 + lora_B·A‖_row


class AdapterKind:
    """The strategy for one adapter family.  Subclasses set the class vars."""

    name: ClassVar[str]
    factor_names: ClassVar[tuple[str, ...]]  # the tensors each adapted module carries
    row_factor_names: ClassVar[tuple[str, ...]]  # those with one row per output feature
    add_residual: ClassVar[bool] = False
    has_row_scale: ClassVar[bool] = True  # False: row_scale is always None (plain addition)

    def factor_shapes(self, r: int, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def delta(self, module: ModuleAdapter) -> torch.Tensor:
        """ΔW in fp32, torch layout.  -> (out, in)"""
        raise NotImplementedError

    def delta_forward(self, x: torch.Tensor, module: ModuleAdapter) -> torch.Tensor:
        """ΔW x through the low-rank factors, never forming ΔW, in x's dtype.  x: (..., in) -> (..., out)"""
        raise NotImplementedError

    def row_scale(self, w0: torch.Tensor, delta: torch.Tensor, module: ModuleAdapter) -> torch.Tensor | None:
        """The per-row scale s of the formula, (out, 1), or None for plain addition."""
        return None

    def rows_of(self, module: ModuleAdapter, rows: slice) -> ModuleAdapter:
        """The module cut to output rows `rows`: its ΔW and row scale are those rows of the whole module's."""
        factors = {name: t[rows] if name in self.row_factor_names else t for name, t in module.factors.items()}
        return dataclasses.replace(module, factors=factors)

    def blocked_row_scale(self, w0: torch.Tensor, module: ModuleAdapter) -> torch.Tensor | None:
        """row_scale, a block of output rows at a time (formula.row_slices): ΔW and the fp32 copy of W0 are
        formed a block at a time, never (out, in) whole.  w0: (out, in), any float dtype -> (out, 1) or None"""
        if not self.has_row_scale:
            return None
        return joined_row_scale([scale for *_, scale in self.row_blocks(w0, module)])

    def row_blocks(
        self, w0: torch.Tensor, module: ModuleAdapter
    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Per block of output rows: the rows, W0's in fp32 (rows, in), ΔW's (rows, in), the row scale (rows, 1).

        A zero-norm row is a FusionError naming the module and the row.  w0: (out, in), any float dtype
        """
        for rows in formula.row_slices(w0):
            part = self.rows_of(module, rows)
            w0_rows, delta = w0[rows].to(formula.COMPUTE_DTYPE), self.delta(part)  # (rows, in) each
            try:
                scale = self.row_scale(w0_rows, delta, part)
            except formula.FusionError:
                error = formula.zero_norm_error(formula.adapted_row_norm(w0_rows, delta), rows.start)
                raise formula.FusionError(f"{module.path}: {error}") from None
            yield rows, w0_rows, delta, scale

    def low_rank(self, module: ModuleAdapter) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in fp32 with ΔW = scaling · B A.  -> (k, in), (out, k)"""
        raise NotImplementedError

    def fuse(self, w0_stored: torch.Tensor, module: ModuleAdapter) -> torch.Tensor:
        """Ŵ in fp32, in the stored layout of w0 ((in, out) when fan_in_fan_out)."""
        return self.fused_whole(w0_stored, module)[0]

    def row_scaled(self, w0_stored: torch.Tensor, module: ModuleAdapter) -> RowScaledLowRank:
        """The per-request form (A, B̃, d), d exactly the row scale `fuse` applies."""
        return self.row_scaled_form(module, self.blocked_row_scale(out_in(w0_stored, module), module))

    def fused_rows(
        self, w0: torch.Tensor, module: ModuleAdapter
    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor | None]]:
        """Ŵ a block of output rows at a time, each checked finite: (rows, Ŵ's rows in fp32 (rows, in), their
        row scale (rows, 1) or None).  w0: (out, in), any float dtype (a view of a mapped tensor will do)"""
        for rows, w0_rows, delta, scale in self.row_blocks(w0, module):
            fused = formula.fuse(w0_rows, delta, scale, self.add_residual)  # (rows, in)
            formula.check_finite(fused, module.path)
            yield rows, fused, scale

    def fused_whole(self, w0_stored: torch.Tensor, module: ModuleAdapter) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Ŵ in fp32 (stored layout), formed a block of rows at a time, and its row scale (out, 1) or None."""
        w0 = out_in(w0_stored, module)  # (out, in)
        fused = torch.empty(w0.shape, dtype=formula.COMPUTE_DTYPE)  # (out, in)
        scales = []
        for rows, fused_rows, scale in self.fused_rows(w0, module):
            fused[rows] = fused_rows
            scales.append(scale)
        return (fused.T if module.fan_in_fan_out else fused), joined_row_scale(scales)

    def row_scaled_form(self, module: ModuleAdapter, row_scale: torch.Tensor | None) -> RowScaledLowRank:
        """The per-request form from the module's row scale (out, 1), or None for plain LoRA."""
        a, b = self.low_rank(module)
        form = RowScaledLowRank(
            a, formula.row_scaled_b(b, module.scaling, row_scale, self.add_residual), _flat(row_scale)
        )
        self._check_finite(module, form.b, form.row_scale)
        return form

    def dora(self, w0_stored: torch.Tensor, module: ModuleAdapter) -> DoraFactors:
        """The same fused weight as a PEFT DoRA adapter (lora_A, lora_B, magnitude), scaling 1."""
        w0 = out_in(w0_stored, module)  # (out, in)
        row_scale = self.blocked_row_scale(w0, module)
        a, b = self.low_rank(module)
        try:
            b_dora = formula.dora_b(b, module.scaling, row_scale, self.add_residual)
        except formula.FusionError as err:
            raise formula.FusionError(f"{module.path}: {err}") from None
        factors = DoraFactors(a, b_dora, formula.dora_magnitude(w0, a, b_dora, row_scale))
        self._check_finite(module, factors.b, factors.magnitude)
        return factors

    @staticmethod
    def _check_finite(module: ModuleAdapter, *tensors: torch.Tensor | None) -> None:
        for tensor in tensors:
            if tensor is not None:
                formula.check_finite(tensor, module.path)


def out_in(w0_stored: torch.Tensor, module: ModuleAdapter) -> torch.Tensor:
    """A weight of the module in torch layout (a view).  -> (out, in)"""
    return w0_stored.T if module.fan_in_fan_out else w0_stored


def joined_row_scale(scales: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The blocks' row scales as one (out, 1), or None where the kind has none (plain LoRA)."""
    return None if not scales or scales[0] is None else torch.cat([s for s in scales if s is not None])


def _flat(row_scale: torch.Tensor | None) -> torch.Tensor | None:
    return None if row_scale is None else row_scale.reshape(-1)


def _low_rank_forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B(Ax).  x: (..., in), a: (r, in), b: (out, r) -> (..., out)"""
    return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))


def _lora_shapes(r: int, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    return {"lora_A.weight": (r, in_features), "lora_B.weight": (out_features, r)}


class LoraKind(AdapterKind):
    name = "LORA"
    factor_names: ClassVar[tuple[str, ...]] = ("lora_A.weight", "lora_B.weight")
    row_factor_names: ClassVar[tuple[str, ...]] = ("lora_B.weight",)
    has_row_scale: ClassVar[bool] = False

    def factor_shapes(self, r, out_features, in_features):
        return _lora_shapes(r, out_features, in_features)

    def delta(self, module):
        f = module.factors
        return formula.low_rank_delta(f["lora_A.weight"], f["lora_B.weight"], module.scaling)

    def delta_forward(self, x, module):
        f = module.factors
        return module.scaling * _low_rank_forward(x, f["lora_A.weight"], f["lora_B.weight"])

    def low_rank(self, module):
        f = module.factors
        return f["lora_A.weight"].to(formula.COMPUTE_DTYPE), f["lora_B.weight"].to(formula.COMPUTE_DTYPE)


class DoraKind(LoraKind):
    """PEFT DoRA: Ŵ = (m / ‖W0 + ΔW‖_row) · (W0 + ΔW), m = lora_magnitude_vector."""

    name = "DORA"
    factor_names = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    row_factor_names = ("lora_B.weight", "lora_magnitude_vector")
    has_row_scale = True

    def factor_shapes(self, r, out_features, in_features):
        return {**_lora_shapes(r, out_features, in_features), "lora_magnitude_vector": (out_features,)}

    def row_scale(self, w0, delta, module):
        return formula.dora_row_scale(w0, delta, module.factors["lora_magnitude_vector"])


class D2LoraKind(AdapterKind):
    """D²-LoRA: ΔW = s(B₊A₊ − τB₋A₋), Ŵ = (n0/n′)(W0 + ΔW) + ΔW."""

    name = "D2LORA"
    factor_names = ("lora_A.weight", "lora_B.weight", "lora_A_neg.weight", "lora_B_neg.weight")
    row_factor_names = ("lora_B.weight", "lora_B_neg.weight")
    add_residual = True

    def factor_shapes(self, r, out_features, in_features):
        neg = {"lora_A_neg.weight": (r, in_features), "lora_B_neg.weight": (out_features, r)}
        return {**_lora_shapes(r, out_features, in_features), **neg}

    def delta(self, module):
        f = module.factors
        return formula.d2lora_delta(
            f["lora_A.weight"],
            f["lora_B.weight"],
            f["lora_A_neg.weight"],
            f["lora_B_neg.weight"],
            module.scaling,
            module.tau,
        )

    def stacked_factors(self, module: ModuleAdapter) -> tuple[torch.Tensor, torch.Tensor]:
        """A = [A₊; A₋] (2r, in), B = [B₊, −τB₋] (out, 2r), so ΔW = scaling · B A (formula.d2lora_factors)."""
        f = module.factors
        return formula.d2lora_factors(
            f["lora_A.weight"], f["lora_B.weight"], f["lora_A_neg.weight"], f["lora_B_neg.weight"], module.tau
        )

    def low_rank(self, module):
        f = {name: t.to(formula.COMPUTE_DTYPE) for name, t in module.factors.items()}  # cast first, as d2lora_delta
        return formula.d2lora_factors(
            f["lora_A.weight"], f["lora_B.weight"], f["lora_A_neg.weight"], f["lora_B_neg.weight"], module.tau
        )  # (2r, in), (out, 2r)

    def delta_forward(self, x, module):
        a, b = self.stacked_factors(module)  # (2r, in), (out, 2r)
        return _low_rank_forward(x, a, module.scaling * b)  # one rank-2r branch; scaling on the small factor

    def row_scale(self, w0, delta, module):
        return formula.d2lora_row_scale(w0, delta)


ADAPTER_KINDS: dict[str, type[AdapterKind]] = {k.name: k for k in (D2LoraKind, LoraKind, DoraKind)}

# Older PEFT releases and some exporters store the DoRA magnitude with a ".weight" suffix.
FACTOR_ALIASES = {"lora_magnitude_vector.weight": "lora_magnitude_vector"}


def kind_for(config: AdapterConfig) -> AdapterKind:
    try:
        return ADAPTER_KINDS[config.kind]()
    except KeyError:
        known = ", ".join(sorted(k for k in ADAPTER_KINDS if k != "DORA"))
        raise AdapterConfigError(f"peft_type: {config.peft_type!r} is not supported (known: {known})") from None
