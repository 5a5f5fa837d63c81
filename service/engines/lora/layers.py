"""The row scale in vLLM's LoRA linear layers: output = d[slot of token] ⊙ (W0 x) + bias + B̃ A x.

Installed over `BaseLinearLayerWithLoRA._apply_sync` (the path of every linear
LoRA layer: qkv, gate_up, o, down, ...) and `_apply_base_forward` (layers with a
custom base forward).  Each layer keeps a `SlotState`: which adapter slots
hold weights for it, and a (slots + 1, out) table of row scales whose last row,
used by tokens without an adapter, is all ones.  Packed layers have one table
over all their slices, so each slice is scaled by its own module's d.

With the CPU punica wrapper of this plugin the step's plan says which slots
are present: a layer none of them adapts runs the base alone (exactly), and the
scale is applied only when a present slot has one.  On other platforms (vLLM's
own punica ops) the scale is applied whenever a loaded slot has one.
"""

from __future__ import annotations

import torch
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

from service.engines.lora.ops import FusedSlots, StepPlan, scale_rows

STATE_ATTR = "d2lora_slots"
NO_PLAN = object()  # the punica wrapper is vLLM's own: no per-step plan to consult


class SlotState:
    """Per LoRA linear layer: the slots holding weights for it and their row scales."""

    def __init__(self, num_slots: int, out_features: int, device: torch.device, fused: FusedSlots | None = None):
        self.num_slots = num_slots
        self.fused = fused  # the slots' weights laid out for the grouped ops (CPU), or None (vLLM's own ops)
        self.row_scale = torch.ones(num_slots + 1, out_features, dtype=torch.float32, device=device)  # (slots+1, out)
        self.loaded: set[int] = set()  # slots whose adapter has factors for this layer
        self.scaled: set[int] = set()  # slots whose adapter has a row scale here (d ≠ 1)

    def set_slot(self, index: int, loaded: bool, row_scale: torch.Tensor | None) -> None:
        """What slot `index` holds for this layer now.  row_scale: (out,) or None for d = 1."""
        self.loaded.discard(index)
        self.scaled.discard(index)
        if loaded:
            self.loaded.add(index)
        if row_scale is None:
            self.row_scale[index].fill_(1.0)
            return
        if tuple(row_scale.shape) != tuple(self.row_scale.shape[1:]):
            rows = self.row_scale.shape[1]
            raise ValueError(f"row scale of shape {list(row_scale.shape)} for a layer of {rows} output rows")
        self.row_scale[index].copy_(row_scale)
        self.scaled.add(index)


def slot_state(layer: BaseLinearLayerWithLoRA, num_slots: int) -> SlotState:
    """The layer's SlotState, created on first use.

    Under the grouped punica wrapper the layer's stacked LoRA tensors move into FusedSlots (their contents
    copied), and the layer keeps views of it, so vLLM's set_lora / reset_lora write where the ops read.
    """
    state = layer.__dict__.get(STATE_ATTR)
    if state is None:
        fused = None
        if _plan(layer) is not NO_PLAN:
            fused, layer.lora_a_stacked, layer.lora_b_stacked = FusedSlots.adopt(
                layer.lora_a_stacked, layer.lora_b_stacked, tuple(layer.output_slices)
            )
        state = SlotState(num_slots, sum(layer.output_slices), layer.lora_a_stacked[0].device, fused)
        layer.__dict__[STATE_ATTR] = state
    return state


def _plan(layer: BaseLinearLayerWithLoRA) -> StepPlan | None | object:
    return getattr(layer.punica_wrapper, "d2lora_plan", NO_PLAN)


def _uses(layer: BaseLinearLayerWithLoRA, plan: StepPlan | None | object) -> tuple[bool, bool]:
    """(apply the LoRA, apply the row scale) for this layer in this step."""
    state: SlotState | None = layer.__dict__.get(STATE_ATTR)
    if plan is NO_PLAN:
        return True, state is not None and bool(state.scaled)
    if plan is None or state is None or not isinstance(plan, StepPlan):
        return False, False
    return not plan.present.isdisjoint(state.loaded), not plan.present.isdisjoint(state.scaled)


def _scale(layer: BaseLinearLayerWithLoRA, output: torch.Tensor, plan: StepPlan | None | object) -> None:
    """output (tokens, out) *= d[slot of token], in place."""
    state: SlotState = layer.__dict__[STATE_ATTR]
    if isinstance(plan, StepPlan):
        scale_rows(output, state.row_scale, plan)
        return
    slots = layer.punica_wrapper.token_lora_indices[: output.shape[0]]  # (tokens,), −1: no adapter
    output.mul_(state.row_scale.index_select(0, torch.where(slots >= 0, slots, state.num_slots)))


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The transformers backend's (1, tokens, f) as (tokens, f); vLLM's own (tokens, f) unchanged."""
    return t.flatten(0, 1) if t.ndim == 3 else t


def _add_lora(layer: BaseLinearLayerWithLoRA, flat_output: torch.Tensor, x: torch.Tensor) -> None:
    """flat_output (tokens, out) += B̃ A x: the grouped ops on the fused slots, else the layer's punica wrapper."""
    state: SlotState | None = layer.__dict__.get(STATE_ATTR)
    plan = _plan(layer)
    if state is not None and state.fused is not None and isinstance(plan, StepPlan):
        state.fused.add(flat_output, _flat(x), plan)
        return
    wrapper = layer.punica_wrapper
    wrapper.add_lora_linear(flat_output, _flat(x), layer.lora_a_stacked, layer.lora_b_stacked, 1.0, layer.output_slices)


def apply_sync(self: BaseLinearLayerWithLoRA, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """BaseLinearLayerWithLoRA._apply_sync with the row scale: d ⊙ (W0 x) + bias + B̃ A x."""
    plan = _plan(self)
    lora, scaled = _uses(self, plan)
    method = self._get_quant_method()
    if not lora:
        return method.apply(self.base_layer, x, bias)
    output = method.apply(self.base_layer, x, None if scaled else bias)  # (tokens, out) or (1, tokens, out)
    flat = _flat(output)
    if scaled:
        _scale(self, flat, plan)
    _add_lora(self, flat, x)
    if scaled and bias is not None:
        flat += bias
    return output


def apply_base_forward(self: BaseLinearLayerWithLoRA, x: torch.Tensor) -> torch.Tensor:
    """BaseLinearLayerWithLoRA._apply_base_forward (custom base forwards, bias inside) with the row scale.

    The base output already holds the bias b, so the scale keeps it whole: d ⊙ y + (1 − d) ⊙ b.
    """
    base_output = self.base_layer(x)
    output = base_output[0] if isinstance(base_output, tuple) else base_output
    plan = _plan(self)
    lora, scaled = _uses(self, plan)
    if not lora:
        return output
    flat = _flat(output)
    if scaled:
        bias = getattr(self.base_layer, "bias", None)
        kept = None if bias is None or getattr(self.base_layer, "skip_bias_add", False) else flat - bias
        _scale(self, flat if kept is None else kept, plan)
        if kept is not None:
            flat.copy_(kept + bias)
    _add_lora(self, flat, x)
    return output
