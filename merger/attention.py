"""The attention function streamed models run: transformers' SDPA, its key/value heads shared inside the kernel.

Under an attention mask (the probes are left-padded, so there always is one) transformers' "sdpa"
copies every key/value head once per query head it serves (`repeat_kv`) before calling torch's
kernel; with grouped-query attention that copy of the KV cache is most of a decode step's
attention.  torch's `scaled_dot_product_attention(..., enable_gqa=True)` shares the heads itself
and gives the same values bit for bit (8 probes, 32 query / 4 key-value heads, 100 cached
positions: 0.44 vs 1.6 ms a layer here).  Anything this does not cover (a position bias, a paged
cache, no grouping) goes to transformers' own function unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

NAME = "d2lora_shared_kv_sdpa"  # the attn_implementation streamed skeletons are built with


def shared_kv_sdpa(
    module: nn.Module,
    query: torch.Tensor,  # (batch, heads, q, head_dim)
    key: torch.Tensor,  # (batch, kv_heads, kv, head_dim)
    value: torch.Tensor,  # (batch, kv_heads, kv, head_dim)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or groups == 1 or kwargs.get("position_bias") is not None or kwargs.get("cache"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )  # (batch, heads, q, head_dim)
    return out.transpose(1, 2).contiguous(), None  # (batch, q, heads, head_dim)


def register() -> str:
    """Make NAME an attn_implementation transformers accepts, with SDPA's 4-d masks (idempotent); -> NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, shared_kv_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_shared_kv_sdpa(model: PreTrainedModel) -> None:
    """Run shared_kv_sdpa where transformers would run its own SDPA through its attention interface.

    A model that transformers gives eager attention, or whose attention classes do not dispatch through
    AttentionInterface, keeps what it has.
    """
    if model.config._attn_implementation == "sdpa" and model.is_backend_compatible():
        model.set_attn_implementation(register())
