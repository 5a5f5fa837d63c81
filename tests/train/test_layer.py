"""The D²-LoRA training layer against the merger's fused weight (merger.kinds / merger.formula)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from merger.kinds import D2LoraKind
from merger.train.layer import D2LoraLayer, attach_d2lora

IN_FEATURES, OUT_FEATURES, RANK = 48, 40, 4


def make_base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv1d":  # GPT-2 layout: weight (in, out)
        base = Conv1D(OUT_FEATURES, IN_FEATURES)
        nn.init.normal_(base.weight, std=0.1)
        nn.init.normal_(base.bias, std=0.1)
        return base
    return nn.Linear(IN_FEATURES, OUT_FEATURES)


def randomise_b(layer: D2LoraLayer) -> None:
    with torch.no_grad():
        layer.lora_B.normal_(std=0.2)
        layer.lora_B_neg.normal_(std=0.2)


def merged_forward(layer: D2LoraLayer, x: torch.Tensor) -> torch.Tensor:
    """x through the weight the merger would write: Ŵ from merger.kinds, in the stored layout."""
    module = layer.module_adapter()
    fused = D2LoraKind().fuse(layer.base.weight.detach(), module)  # stored layout
    weight = fused.T if layer.fan_in_fan_out else fused  # (out, in)
    return nn.functional.linear(x, weight, layer.base.bias)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_equals_the_merged_weight(kind):
    layer = D2LoraLayer(make_base(kind), "proj", RANK, lora_alpha=8, tau=0.5)
    randomise_b(layer)
    x = torch.randn(3, 7, IN_FEATURES)
    with torch.no_grad():
        unmerged, merged = layer(x), merged_forward(layer, x)
    assert (unmerged - layer.base(x)).abs().max() > 1e-2  # the adapter does change the output
    torch.testing.assert_close(unmerged, merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_a_fresh_layer_is_the_base(kind):
    base = make_base(kind)
    layer = D2LoraLayer(base, "proj", RANK, lora_alpha=8)
    x = torch.randn(2, 5, IN_FEATURES)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)  # Conv1D's addmm rounds differently


def test_the_two_branches_start_orthogonal_and_nonzero():
    layer = D2LoraLayer(make_base("linear"), "proj", RANK, lora_alpha=8)
    assert layer.lora_A.norm() > 0
    assert layer.lora_A_neg.norm() > 0
    torch.testing.assert_close(layer.lora_A @ layer.lora_A_neg.T, torch.zeros(RANK, RANK), atol=1e-6, rtol=0)


def test_at_init_both_b_factors_get_gradient():
    layer = D2LoraLayer(make_base("linear"), "proj", RANK, lora_alpha=8, tau=0.5)
    layer(torch.randn(4, IN_FEATURES)).square().sum().backward()
    assert layer.lora_B.grad.abs().max() > 0
    assert layer.lora_B_neg.grad.abs().max() > 0


def test_one_step_moves_all_four_factors_and_never_the_base():
    base = make_base("linear")
    layer = D2LoraLayer(base, "proj", RANK, lora_alpha=8)
    randomise_b(layer)
    frozen = {name: t.detach().clone() for name, t in base.state_dict().items()}
    before = {name: t.detach().clone() for name, t in layer.factors().items()}
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    (layer(torch.randn(4, 6, IN_FEATURES)) - torch.randn(4, 6, OUT_FEATURES)).square().mean().backward()
    for name, factor in layer.factors().items():
        assert factor.grad is not None and factor.grad.abs().max() > 0, name
    optimizer.step()
    for name, factor in layer.factors().items():
        assert not torch.equal(factor, before[name]), name
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, frozen[name]), name


def test_attach_wraps_only_the_targets_and_freezes_the_rest():
    model = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "up_proj": nn.Linear(8, 16), "norm": nn.LayerNorm(8)})
    layers = attach_d2lora(model, lambda path: path.endswith("q_proj"), r=2, lora_alpha=4, tau=0.5)
    assert list(layers) == ["q_proj"] and isinstance(model["q_proj"], D2LoraLayer)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj.lora_A", "q_proj.lora_B", "q_proj.lora_A_neg", "q_proj.lora_B_neg"}
