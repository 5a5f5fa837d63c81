"""Run an adapter UNMERGED on a transformers causal LM: the reference forward.

Every targeted Linear (or GPT-2 Conv1D, stored (in, out) with fan_in_fan_out)
is replaced by an `UnmergedLinear` computing

    y = s ⊙ (W0 x + ΔW x) + c · ΔW x + bias        (merger.formula.combine_outputs)

where ΔW x goes through the low-rank factors on the activations (the kind's
`delta_forward`, never the dense ΔW) and s is the kind's per-row scale.  The
scale needs ΔW's rows for its row norms (formed a block of rows at a time): it is either computed once
and cached (inference, the default) or recomputed on every forward (the
training-time path, as DoRA does it), which is slower but tracks W0 and the
factors if they change.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from merger import formula
from merger.artifact import Adapter
from merger.checkpoint import checkpoint_shapes
from merger.errors import D2LoraError
from merger.kinds import AdapterKind, ModuleAdapter


class UnmergedModelError(D2LoraError):
    """The model does not have the modules the adapter targets."""


class UnmergedLinear(nn.Module):
    """A frozen base Linear / Conv1D plus one adapter applied on the fly."""

    weight: torch.Tensor  # stored layout ((in, out) for Conv1D); shared with the base, not copied
    bias: torch.Tensor | None
    cached_scale: torch.Tensor | None  # (out, 1), or None when recomputed or for plain LoRA

    def __init__(self, base: nn.Module, kind: AdapterKind, adapter: ModuleAdapter, recompute_scale: bool = False):
        super().__init__()
        self.kind, self.recompute_scale, self.fan_in_fan_out = kind, recompute_scale, adapter.fan_in_fan_out
        self.weight, self.bias = base.get_parameter("weight"), getattr(base, "bias", None)
        # a weight on meta is materialised before each forward (merger.streaming): the factors stay on the CPU
        device = "cpu" if self.weight.is_meta else self.weight.device
        factors = {name: t.to(device, formula.COMPUTE_DTYPE) for name, t in adapter.factors.items()}
        self.adapter = dataclasses.replace(adapter, factors=factors)
        self.register_buffer("cached_scale", None if recompute_scale else self.compute_row_scale(), persistent=False)

    def weight_out_in(self) -> torch.Tensor:
        """W0 in torch layout.  -> (out, in)"""
        return self.weight.T if self.fan_in_fan_out else self.weight

    def compute_row_scale(self) -> torch.Tensor | None:
        """s from W0 and ΔW (fp32, norms in float64), a block of rows at a time.  -> (out, 1) or None"""
        return self.kind.blocked_row_scale(self.weight_out_in().detach(), self.adapter)

    def row_scale(self) -> torch.Tensor | None:
        return self.compute_row_scale() if self.recompute_scale else self.cached_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        base_out = F.linear(x, self.weight_out_in())  # (..., out)
        delta_out = self.kind.delta_forward(x, self.adapter)  # (..., out)
        y = formula.combine_outputs(base_out, delta_out, self.row_scale(), self.kind.add_residual)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"path={self.adapter.path!r}, kind={self.kind.name}, recompute_scale={self.recompute_scale}"


def module_path(model: nn.Module, path: str) -> str:
    """The model's name for a checkpoint module path, also when the checkpoint omits the base-model prefix."""
    prefix = getattr(model, "base_model_prefix", "")
    for candidate in (path, f"{prefix}.{path}"):
        try:
            model.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    raise UnmergedModelError(f"{path}: no such module in the model")


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)


def model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the model's state dict, in checkpoint naming."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def apply_unmerged(
    model: nn.Module,
    adapter: Adapter,
    recompute_scale: bool = False,
    base_shapes: dict[str, tuple[int, ...]] | None = None,
) -> nn.Module:
    """Replace every module the adapter targets by an UnmergedLinear, in place; returns the model.

    base_shapes (e.g. merger.checkpoint.checkpoint_shapes(base_dir)) validates the adapter
    against the checkpoint; by default the model's own state dict is used.
    """
    bound = adapter.bind(base_shapes if base_shapes is not None else model_shapes(model))
    for module_adapter in bound:
        path = module_path(model, module_adapter.path)
        unmerged = UnmergedLinear(model.get_submodule(path), adapter.kind, module_adapter, recompute_scale)
        _replace(model, path, unmerged)
    return model


def load_unmerged(
    base_dir: str | Path, adapter: Adapter, dtype: torch.dtype = torch.float32, recompute_scale: bool = False
) -> nn.Module:
    """The base checkpoint in `dtype` (float32: the adapter's exact function) with the adapter unmerged."""
    from transformers import AutoModelForCausalLM

    shapes = checkpoint_shapes(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()
    return apply_unmerged(model, adapter, recompute_scale, shapes)
