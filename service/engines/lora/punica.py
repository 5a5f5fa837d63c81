"""vLLM's CPU punica wrapper with grouped ops: one grouped matmul per op over the adapter slots present.

`update_metadata` (once per step, when the token → slot mapping changes) keeps
vLLM's own metadata and adds this plugin's `StepPlan`; `add_lora_linear` (every
linear LoRA layer) runs `ops.add_grouped_lora`, and nothing at all in a step
where no token has an adapter.  Tokens without one get exactly the base output
(vLLM's CPU `bgmv` ops index the stacked weights with their −1, the last slot).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from service.engines.lora.ops import StepPlan, add_grouped_lora, plan_step

QUALNAME = f"{__name__}.GroupedPunicaWrapper"


class GroupedPunicaWrapper(PunicaWrapperCPU):
    d2lora_plan: StepPlan | None = None

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs) -> None:
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self.d2lora_plan = plan_step(self.token_lora_indices, len(lora_index_to_id))

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        """y += B (A x) per token's slot, slice by slice; scale is 1 (vLLM folds the LoRA scaling into B)."""
        if self.d2lora_plan is None:
            return
        if scale != 1.0:
            raise ValueError(f"grouped LoRA ops expect the scaling folded into lora_b, got scale {scale}")
        flat_y, flat_x = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])  # (tokens, out), (tokens, in)
        add_grouped_lora(flat_y, flat_x, lora_a_stacked, lora_b_stacked, self.d2lora_plan)
