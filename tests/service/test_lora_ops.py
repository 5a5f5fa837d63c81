"""The plugin's grouped LoRA ops against a per-token reference, and vLLM's own CPU ops on base tokens."""

from __future__ import annotations

import pytest
import torch

from service.engines.lora.ops import BLOCK_DIAGONAL_MAX_TOKENS, FusedSlots, add_grouped_lora, plan_step, scale_rows

SLOTS, RANK, IN = 4, 8, 32
OUTS = (24, 8, 8)  # a packed qkv-like layer: three slices


def stacked(gen: torch.Generator) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """vLLM's layout: lora_a[j] (slots, 1, k, in), lora_b[j] (slots, 1, out_j, k)."""
    a = tuple(torch.randn(SLOTS, 1, RANK, IN, generator=gen) for _ in OUTS)
    b = tuple(torch.randn(SLOTS, 1, out, RANK, generator=gen) for out in OUTS)
    return a, b


def per_token(x: torch.Tensor, slots: list[int], a, b) -> torch.Tensor:
    """Σ_j B_j[s] A_j[s] x[t] token by token, 0 where s = −1.  -> (tokens, Σ out_j)"""
    rows = []
    for t, s in enumerate(slots):
        if s < 0:
            rows.append(torch.zeros(sum(OUTS)))
            continue
        rows.append(torch.cat([b[j][s, 0] @ (a[j][s, 0] @ x[t]) for j in range(len(OUTS))]))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "slots",
    [
        [0, 0, 0, 1, 1, 2],  # sorted: no gather
        [3, -1, 0, 3, 1, -1, 0, 2, 2, 3],  # decode-like: interleaved, with base tokens
        [-1, -1, 2, -1],  # one slot among base tokens
        [1] * 40 + [-1] * 5 + [3] * 7,  # a long prefill run, base tokens, another run
    ],
)
def test_grouped_lora_equals_per_token_products(slots):
    gen = torch.Generator().manual_seed(len(slots))
    a, b = stacked(gen)
    x = torch.randn(len(slots), IN, generator=gen)
    base = torch.randn(len(slots), sum(OUTS), generator=gen)
    plan = plan_step(torch.tensor(slots), SLOTS)
    assert plan is not None and plan.present == frozenset(s for s in slots if s >= 0)
    y = base.clone()
    add_grouped_lora(y, x, a, b, plan)
    torch.testing.assert_close(y, base + per_token(x, slots, a, b), rtol=1e-5, atol=1e-4)
    base_rows = [t for t, s in enumerate(slots) if s < 0]
    assert torch.equal(y[base_rows], base[base_rows]), "a token without an adapter must keep the base output exactly"


@pytest.mark.parametrize("tokens", [12, BLOCK_DIAGONAL_MAX_TOKENS + 9])  # block-diagonal expand, then slice by slice
def test_fused_slots_written_through_vllms_views_equal_per_token_products(tokens):
    gen = torch.Generator().manual_seed(tokens)
    a, b = stacked(gen)
    zeros_a, zeros_b = tuple(torch.zeros_like(t) for t in a), tuple(torch.zeros_like(t) for t in b)
    fused, a_views, b_views = FusedSlots.adopt(zeros_a, zeros_b, OUTS)
    assert [v.shape for v in a_views] == [t.shape for t in a] and [v.shape for v in b_views] == [t.shape for t in b]
    for slot in range(SLOTS):  # as vLLM's set_lora writes a slot: into the stacked tensors it holds
        for j in range(len(OUTS)):
            a_views[j][slot, 0].copy_(a[j][slot, 0])
            b_views[j][slot, 0].copy_(b[j][slot, 0])
    slots = torch.randint(-1, SLOTS, (tokens,), generator=gen)
    x = torch.randn(tokens, IN, generator=gen)
    y = torch.zeros(tokens, sum(OUTS))
    fused.add(y, x, plan_step(slots, SLOTS))
    torch.testing.assert_close(y, per_token(x, slots.tolist(), a, b), rtol=1e-5, atol=1e-4)


def test_adopting_keeps_what_the_stacked_tensors_held():
    gen = torch.Generator().manual_seed(5)
    a, b = stacked(gen)
    _, a_views, b_views = FusedSlots.adopt(a, b, OUTS)
    assert all(torch.equal(v, t) for v, t in zip((*a_views, *b_views), (*a, *b), strict=True))


def test_sorted_tokens_need_no_gather():
    assert plan_step(torch.tensor([0, 0, 2, 2, 3, -1]), SLOTS).order is None
    assert plan_step(torch.tensor([2, 0]), SLOTS).order is not None


def test_a_step_without_adapters_has_no_plan():
    assert plan_step(torch.tensor([-1, -1, -1]), SLOTS) is None


def test_row_scale_leaves_base_tokens_exact():
    gen = torch.Generator().manual_seed(0)
    table = torch.ones(SLOTS + 1, 5)
    table[:SLOTS] = 1 + 0.01 * torch.randn(SLOTS, 5, generator=gen)
    slots = [2, -1, 0, -1]
    y = torch.randn(4, 5, generator=gen)
    scaled = y.clone()
    scale_rows(scaled, table, plan_step(torch.tensor(slots), SLOTS))
    assert torch.equal(scaled[[1, 3]], y[[1, 3]])
    torch.testing.assert_close(scaled[[0, 2]], y[[0, 2]] * table[[2, 0]])


def test_vllm_cpu_ops_give_base_tokens_the_last_slots_adapter():
    """Why the plugin replaces them: vLLM-CPU's sgmv ops index the stacked weights with −1 for tokens without an
    adapter, which is the LAST slot, so once every slot is taken a base request gets an adapter's delta."""
    from vllm.lora.ops.torch_ops import sgmv_expand, sgmv_shrink

    gen = torch.Generator().manual_seed(1)
    a = torch.randn(SLOTS, 1, RANK, IN, generator=gen)  # every slot holds an adapter
    b = torch.randn(SLOTS, 1, OUTS[0], RANK, generator=gen)
    x = torch.randn(3, IN, generator=gen)
    slots = torch.tensor([0, -1, -1])  # token 0: slot 0; tokens 1, 2: the base
    starts, lengths, indices = torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0, -1])
    shrunk = torch.zeros(3, RANK)
    sgmv_shrink(x, a, shrunk, starts, lengths, indices, 2, 2, 3, 1.0)
    theirs = torch.zeros(3, OUTS[0])
    sgmv_expand(shrunk, b, theirs, starts, lengths, indices, 2, 2, 3, add_inputs=True)
    torch.testing.assert_close(theirs[1:], x[1:] @ a[-1, 0].T @ b[-1, 0].T)  # the last slot's delta

    ours = torch.zeros(3, OUTS[0])
    add_grouped_lora(ours, x, (a,), (b,), plan_step(slots, SLOTS))
    assert torch.equal(ours[1:], torch.zeros(2, OUTS[0]))
