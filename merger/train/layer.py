"""The D²-LoRA training layer: a frozen Linear (or GPT-2 Conv1D) plus four factors.

The forward is the unmerged one of SPEC §1, computed without forming Ŵ:

    y = s ⊙ (W0 x + ΔW x) + ΔW x + bias        s = n0 / n′, (out, 1)

- W0 x is the frozen base matmul (one per token, exactly as the base pays);
- ΔW x runs through the low-rank factors on the activations
  (merger.kinds.D2LoraKind.delta_forward), never through an (out, in) weight;
- n′ = ‖W0 + ΔW‖_row is computed under no_grad, as PEFT's DoRA does: the scale
  is a detached (out, 1) constant for the backward pass, so no (out, in) graph
  stays alive between forward and backward.  Its value is exact, so the layer
  equals the merged weight up to rounding; only the gradient ignores ∂n′/∂ΔW.
  It comes from W0 Aᵀ and A Aᵀ (formula.low_rank_adapted_row_norm), never from
  a dense W0 + ΔW: one read of W0 per step instead of writing and rereading an
  (out, in) tensor, which is where DoRA spends its extra time.

All maths comes from merger.formula / merger.kinds; this file only wires it.

Initialisation (and why):
- B₊ = B₋ = 0, so ΔW = 0, s = 1 and the wrapped model starts exactly at the
  base model.
- A₊ and A₋ are the two halves of one orthogonal (2r, in) matrix, scaled to
  the per-element spread of PEFT's LoRA init (kaiming-uniform, a=√5: std
  1/√(3·in)), so learning rates carry over from LoRA.  They must differ: with
  B = 0 the first gradients are ∂L/∂B₊ = s·G (A₊x)ᵀ and ∂L/∂B₋ = −τ·s·G (A₋x)ᵀ
  (G the output gradient, summed over tokens), while A₊ and A₋ get no gradient
  until B moves.  Were A₋ = A₊, then ∂L/∂B₋ = −τ·∂L/∂B₊ at every step, B₋
  would stay a multiple of B₊ (exactly under SGD, and B₋ = −B₊ under Adam's
  sign-like first steps), and B₊A₊ − τB₋A₋ would collapse into one rank-r
  LoRA: the negative branch would be dead weight.  Orthogonal halves read
  disjoint input directions, so the update has rank 2r from the first step.
- Gradient flow to B₋ vs B₊: the negative branch's gradient carries the factor
  τ (0.5 by default), so under plain SGD B₋ learns at τ× the rate of B₊; AdamW
  normalises the magnitude away, so both factors move at the same rate and
  the negative branch contributes τ× as much to ΔW per step, with the sign
  fixed by the −τ.  A zero A₋ (or zero A₊) would leave its branch with zero
  gradient for ever, which is why neither A is initialised to zero.
- The detached scale s multiplies the ΔW x term that is also added back, so
  the output gradient reaching ΔW is (s + 1)·G: twice LoRA's at the start.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from merger import formula
from merger.kinds import D2LoraKind, Factors, ModuleAdapter

KIND = D2LoraKind()
LORA_INIT_GAIN = 1 / math.sqrt(3)  # kaiming-uniform(a=√5) has std 1/√(3·in); orthogonal rows have std 1/√in
FACTOR_PARAMETERS = {
    "lora_A": "lora_A.weight",
    "lora_B": "lora_B.weight",
    "lora_A_neg": "lora_A_neg.weight",
    "lora_B_neg": "lora_B_neg.weight",
}
ADAPTABLE = (nn.Linear, Conv1D)


class D2LoraLayer(nn.Module):
    """A frozen base projection with trainable A₊ (r, in), B₊ (out, r), A₋ (r, in), B₋ (out, r)."""

    base_norm: torch.Tensor  # n0 (out, 1), a buffer

    def __init__(
        self, base: nn.Linear | Conv1D, path: str, r: int, lora_alpha: float, tau: float = 0.5, use_rslora: bool = False
    ) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.path = path
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.scaling = formula.lora_scaling(lora_alpha, r, use_rslora)
        self.tau = tau
        out_features, in_features = self.base_weight().shape
        self.lora_A, self.lora_A_neg = self._init_inputs(r, in_features)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        self.lora_B_neg = nn.Parameter(torch.zeros(out_features, r))
        self.register_buffer("base_norm", formula.row_norm(self.base_weight()), persistent=False)  # n0 (out, 1)

    @staticmethod
    def _init_inputs(r: int, in_features: int) -> tuple[nn.Parameter, nn.Parameter]:
        """A₊, A₋: the two halves of one orthogonal (2r, in) matrix (see the module docstring)."""
        both = nn.init.orthogonal_(torch.empty(2 * r, in_features), gain=LORA_INIT_GAIN)  # (2r, in)
        return nn.Parameter(both[:r].clone()), nn.Parameter(both[r:].clone())

    def base_weight(self) -> torch.Tensor:
        """W0 in torch layout.  -> (out, in)"""
        return self.base.weight.T if self.fan_in_fan_out else self.base.weight

    def factors(self) -> Factors:
        """The four factors under their artifact names (SPEC §2), still attached to autograd."""
        return {name: getattr(self, attr) for attr, name in FACTOR_PARAMETERS.items()}

    def module_adapter(self) -> ModuleAdapter:
        return ModuleAdapter(self.path, self.factors(), self.scaling, self.tau, self.fan_in_fan_out)

    @torch.no_grad()
    def row_scale(self, module: ModuleAdapter) -> torch.Tensor:
        """s = n0 / ‖W0 + ΔW‖_row, detached, from the factors: no (out, in) tensor per step.  -> (out, 1) fp32"""
        a, b = KIND.stacked_factors(module)  # (2r, in), (out, 2r)
        adapted_norm = formula.low_rank_adapted_row_norm(self.base_weight(), self.base_norm, a, b, module.scaling)
        return formula.norm_ratio(self.base_norm, adapted_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module_adapter()
        base_out = F.linear(x, self.base_weight())  # W0 x, (..., out)
        delta_out = KIND.delta_forward(x, module)  # ΔW x, (..., out)
        y = formula.combine_outputs(base_out, delta_out, self.row_scale(module), KIND.add_residual)
        return y if self.base.bias is None else y + self.base.bias


def attach_d2lora(
    model: nn.Module, targets, r: int, lora_alpha: float, tau: float, use_rslora: bool = False
) -> dict[str, D2LoraLayer]:
    """Freeze the model and wrap every Linear/Conv1D whose path `targets(path)` accepts; path -> layer."""
    model.requires_grad_(False)
    chosen = [(path, m) for path, m in model.named_modules() if isinstance(m, ADAPTABLE) and targets(path)]
    layers = {}
    for path, base in chosen:
        parent_path, _, child = path.rpartition(".")
        layers[path] = D2LoraLayer(base, path, r, lora_alpha, tau, use_rslora)
        setattr(model.get_submodule(parent_path), child, layers[path])
    return layers
