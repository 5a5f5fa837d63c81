"""merger.attention: the streamed models' SDPA shares key/value heads in the kernel and gives transformers' values."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from merger import attention
from merger.streaming import skeleton


class _GroupedAttention(nn.Module):
    """What the attention functions read off a transformers attention module."""

    num_key_value_groups = 4
    is_causal = True


def _padded_mask(batch: int, queries: int, keys: int) -> torch.Tensor:
    """SDPA's (batch, 1, q, kv) boolean mask for left-padded rows: row b has b pads, causal among the rest."""
    key_position = torch.arange(keys)  # (kv,)
    query_position = torch.arange(keys - queries, keys)[:, None]  # (q, 1): the last q positions
    pads = torch.arange(batch)[:, None, None, None]  # (batch, 1, 1, 1)
    return (key_position <= query_position) & (key_position >= pads)  # (batch, 1, q, kv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("queries", "keys"), [(1, 37), (9, 9)], ids=["decode step", "prefill"])
def test_shared_heads_give_transformers_sdpa_bit_for_bit(dtype, queries, keys):
    draws = torch.Generator().manual_seed(0)
    query = torch.randn(3, 8, queries, 16, generator=draws).to(dtype)  # (batch, heads, q, head_dim)
    key, value = (torch.randn(3, 2, keys, 16, generator=draws).to(dtype) for _ in range(2))  # 2 kv heads
    mask = _padded_mask(3, queries, keys)
    module = _GroupedAttention()
    shared, _ = attention.shared_kv_sdpa(module, query, key, value, mask, scaling=0.25)
    repeated, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert shared.shape == (3, queries, 8, 16)
    assert torch.equal(shared, repeated)


def test_a_streamed_skeleton_runs_the_shared_heads_attention_where_transformers_runs_sdpa(llama):
    model = skeleton(llama, torch.float32)
    assert model.config._attn_implementation == attention.NAME


def test_a_model_given_eager_attention_keeps_it(llama):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llama), attn_implementation="eager")
    attention.use_shared_kv_sdpa(model)
    assert model.config._attn_implementation == "eager"
