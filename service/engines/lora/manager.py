"""Row scales from the per-request form folder into the layers' slots, when vLLM loads and activates an adapter.

- `LoRAModel.from_local_checkpoint` (vLLM reading an adapter folder): also read
  the folder's row-scale side file (merger.per_request), keyed by vLLM's module
  names (mapped as vLLM maps the factor names).
- `LoRAModelManager.activate_adapter` (vLLM copying an adapter into slot i with
  `set_lora`): also write slot i of every linear LoRA layer's SlotState: whether
  the adapter has factors for the layer, and its row scale (a packed layer's
  table is its parts' d one after another, 1 where a part has none).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
from vllm.lora.lora_model import LoRAModel
from vllm.lora.model_manager import LoRAModelManager
from vllm.lora.utils import parse_fine_tuned_lora_name

from merger.artifact import KEY_PREFIX
from merger.per_request import read_row_scales
from service.engines.lora.layers import slot_state

SCALES_ATTR = "d2lora_row_scales"


def vllm_row_scales(lora_dir: str, weights_mapper: Any, modules: set[str]) -> dict[str, torch.Tensor]:
    """vLLM module name -> d (out,) for the folder's side file; every one must name a module with factors."""
    scales = {}
    for path, row_scale in read_row_scales(lora_dir).items():
        name, _ = parse_fine_tuned_lora_name(f"{KEY_PREFIX}{path}.lora_A.weight", weights_mapper)
        if name not in modules:
            raise ValueError(f"{lora_dir}: row scale for {path}, which has no LoRA factors in the adapter")
        scales[name] = row_scale
    return scales


def wrap_from_local_checkpoint(original: Callable[..., LoRAModel]) -> Callable[..., LoRAModel]:
    def from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper, **kwargs):
        lora = original(cls, lora_dir, expected_lora_modules, peft_helper, **kwargs)
        setattr(lora, SCALES_ATTR, vllm_row_scales(lora_dir, kwargs.get("weights_mapper"), set(lora.loras)))
        return lora

    return from_local_checkpoint


def packed_row_scale(
    manager: LoRAModelManager, name: str, layer: BaseLinearLayerWithLoRA, scales: dict[str, torch.Tensor]
) -> torch.Tensor | None:
    """The layer's row-scale table row for this adapter: (Σ out_j,), or None when every d is 1."""
    parts = manager.packed_modules.get(name, [name])
    if not any(part in scales for part in parts):
        return None
    sizes = list(layer.output_slices)
    if len(sizes) != len(parts):
        raise ValueError(f"{name}: {len(parts)} packed parts for {len(sizes)} output slices")
    return torch.cat([scales.get(part, torch.ones(size)) for part, size in zip(parts, sizes, strict=True)])


def wrap_activate_adapter(original: Callable[[LoRAModelManager, int], bool]) -> Callable[[LoRAModelManager, int], bool]:
    def activate_adapter(self: LoRAModelManager, lora_id: int) -> bool:
        if not original(self, lora_id):
            return False  # already in a slot: its SlotStates are current
        index = self.lora_index_to_id.index(lora_id)
        lora = self._registered_adapters[lora_id]
        scales = getattr(lora, SCALES_ATTR, {})
        for name, module in self.modules.items():
            if isinstance(module, BaseLinearLayerWithLoRA):
                loaded = bool(self._get_lora_layer_weights(lora, name))
                state = slot_state(module, self.lora_slots)
                state.set_slot(index, loaded, packed_row_scale(self, name, module, scales) if loaded else None)
        return True

    return activate_adapter
