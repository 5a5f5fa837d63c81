"""Adapter kinds as a registry of small strategy classes.

A kind knows which factor tensors a module carries, their shapes, and how they
turn into ΔW and the per-row scale of merger.formula. It knows nothing of files.
"""

from __future__ import annotations

import dataclasses
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
    add_residual: ClassVar[bool] = False

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

    def low_rank(self, module: ModuleAdapter) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in fp32 with ΔW = scaling · B A.  -> (k, in), (out, k)"""
        raise NotImplementedError

    def fuse(self, w0_stored: torch.Tensor, module: ModuleAdapter) -> torch.Tensor:
        """Ŵ in fp32, in the stored layout of w0 ((in, out) when fan_in_fan_out)."""
        return self._fused(module, *self._scaled_parts(w0_stored, module))

    def row_scaled(self, w0_stored: torch.Tensor, module: ModuleAdapter) -> RowScaledLowRank:
        """The per-request form (A, B̃, d), d exactly the row scale `fuse` applies."""
        _, _, row_scale = self._scaled_parts(w0_stored, module)
        return self._row_scaled(module, row_scale)

    def fuse_and_row_scale(
        self, w0_stored: torch.Tensor, module: ModuleAdapter
    ) -> tuple[torch.Tensor, RowScaledLowRank]:
        """`fuse` and `row_scaled` at once, W0 read and the row scale computed once for both."""
        w0, delta, row_scale = self._scaled_parts(w0_stored, module)
        return self._fused(module, w0, delta, row_scale), self._row_scaled(module, row_scale)

    def _fused(
        self, module: ModuleAdapter, w0: torch.Tensor, delta: torch.Tensor, row_scale: torch.Tensor | None
    ) -> torch.Tensor:
        fused = formula.fuse(w0, delta, row_scale, self.add_residual)  # (out, in)
        formula.check_finite(fused, module.path)
        return fused.T if module.fan_in_fan_out else fused

    def _row_scaled(self, module: ModuleAdapter, row_scale: torch.Tensor | None) -> RowScaledLowRank:
        a, b = self.low_rank(module)
        form = RowScaledLowRank(
            a, formula.row_scaled_b(b, module.scaling, row_scale, self.add_residual), _flat(row_scale)
        )
        self._check_finite(module, form.b, form.row_scale)
        return form

    def dora(self, w0_stored: torch.Tensor, module: ModuleAdapter) -> DoraFactors:
        """The same fused weight as a PEFT DoRA adapter (lora_A, lora_B, magnitude), scaling 1."""
        w0, _, row_scale = self._scaled_parts(w0_stored, module)
        a, b = self.low_rank(module)
        try:
            b_dora = formula.dora_b(b, module.scaling, row_scale, self.add_residual)
        except formula.FusionError as err:
            raise formula.FusionError(f"{module.path}: {err}") from None
        factors = DoraFactors(a, b_dora, formula.dora_magnitude(w0, a, b_dora, row_scale))
        self._check_finite(module, factors.b, factors.magnitude)
        return factors

    def _scaled_parts(
        self, w0_stored: torch.Tensor, module: ModuleAdapter
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """W0 in torch layout and fp32 (out, in), ΔW (out, in) and the row scale (out, 1) or None."""
        w0 = w0_stored.T if module.fan_in_fan_out else w0_stored  # (out, in)
        w0 = w0.to(formula.COMPUTE_DTYPE)
        delta = self.delta(module)  # (out, in)
        return w0, delta, self._named_row_scale(w0, delta, module)

    @staticmethod
    def _check_finite(module: ModuleAdapter, *tensors: torch.Tensor | None) -> None:
        for tensor in tensors:
            if tensor is not None:
                formula.check_finite(tensor, module.path)

    def _named_row_scale(self, w0: torch.Tensor, delta: torch.Tensor, module: ModuleAdapter) -> torch.Tensor | None:
        """row_scale, with a FusionError (zero-norm row) naming the module."""
        try:
            return self.row_scale(w0, delta, module)
        except formula.FusionError as err:
            raise formula.FusionError(f"{module.path}: {err}") from None


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

    def factor_shapes(self, r, out_features, in_features):
        return {**_lora_shapes(r, out_features, in_features), "lora_magnitude_vector": (out_features,)}

    def row_scale(self, w0, delta, module):
        return formula.dora_row_scale(w0, delta, module.factors["lora_magnitude_vector"])


class D2LoraKind(AdapterKind):
    """D²-LoRA: ΔW = s(B₊A₊ − τB₋A₋), Ŵ = (n0/n′)(W0 + ΔW) + ΔW."""

    name = "D2LORA"
    factor_names = ("lora_A.weight", "lora_B.weight", "lora_A_neg.weight", "lora_B_neg.weight")
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
