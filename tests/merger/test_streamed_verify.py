"""The streamed `d2lora verify` against its whole-model oracle (tests/support/oracle.py): the same numbers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from merger import cpu_linear, formula, streamed_modules, verify
from merger.checkpoint import file_tensors
from merger.kinds import ADAPTER_KINDS, ModuleAdapter
from merger.merge import merge
from merger.probes import NEW_TOKENS
from merger.report import Thresholds
from merger.unmerged import UnmergedLinear
from tests.support.adapters import random_factors, write_random_adapter
from tests.support.oracle import streamed_run, whole_model_floor, whole_model_run

METRIC_TOLERANCE = 1e-6


def assert_same_metrics(streamed, whole) -> None:
    assert streamed.positions == whole.positions
    assert streamed.greedy_first_divergence == whole.greedy_first_divergence
    assert streamed.greedy_agreement == whole.greedy_agreement and streamed.top1_agreement == whole.top1_agreement
    for field in ("max_abs_logit_diff", "relative_logit_error", "mean_kl"):
        assert getattr(streamed, field) == pytest.approx(getattr(whole, field), abs=METRIC_TOLERANCE), field


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_streamed_comparison_equals_the_whole_model_one(tiny_base, adapter_dir, merged_dir, arch):
    streamed = streamed_run(tiny_base(arch), adapter_dir(arch), merged_dir(arch), torch.float32)
    whole = whole_model_run(tiny_base(arch), adapter_dir(arch), merged_dir(arch), torch.float32)
    assert streamed.path.shape == (8, NEW_TOKENS) and torch.equal(streamed.path, whole.path)
    assert torch.equal(whole.reference_greedy, whole.path)  # fp32: the two real decodes agree
    assert_same_metrics(streamed.logits, whole.logits)


@pytest.mark.parametrize(
    ("dtype", "cpu_flags"),
    [(torch.float32, frozenset()), (torch.bfloat16, frozenset({"avx2"})), (torch.bfloat16, frozenset({"amx_bf16"}))],
)
def test_a_linear_streamed_in_row_blocks_computes_the_linear(tmp_path, monkeypatch, dtype, cpu_flags):
    """StreamedLinear, a few rows at a time, from a real safetensors file: its kernel's output on the whole
    weight in `dtype` (on a CPU without bf16 instructions and on one with them)."""
    monkeypatch.setattr(cpu_linear, "_this_cpu_flags", lambda: cpu_flags)
    monkeypatch.setattr(streamed_modules, "LINEAR_BLOCK_BYTES", 3 * 40 * 4)  # 3 rows of 40 fp32 features: 17 blocks
    weight, bias = torch.randn(50, 40), torch.randn(50)  # (out, in), (out,)
    save_file({"w": weight, "b": bias}, tmp_path / "linear.safetensors")
    stored = file_tensors(tmp_path / "linear.safetensors")
    linear = streamed_modules.StreamedLinear(streamed_modules.TensorPool(), stored["w"], stored["b"], dtype)
    x = torch.randn(2, 7, 40, dtype=dtype)  # (batch, seq, in)
    kernel = cpu_linear.kernel_for(dtype, cpu_flags)
    assert linear.kernel is kernel
    expected = kernel.linear(x, weight.to(dtype), bias.to(dtype))  # (batch, seq, out)
    torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stored_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["D2LORA", "LORA", "DORA"])
def test_an_adapted_linear_streamed_in_row_blocks_computes_the_unmerged_one(tmp_path, monkeypatch, kind, stored_dtype):
    """StreamedUnmergedLinear, W0 and its row scale 3 rows at a time (17 blocks, the last short), from a real
    safetensors file: UnmergedLinear's output on the whole weight."""
    draws = torch.Generator().manual_seed(7)
    weight = torch.randn(50, 40, generator=draws).to(stored_dtype)  # (out, in)
    bias = torch.randn(50, generator=draws).to(stored_dtype)  # (out,)
    save_file({"w": weight, "b": bias}, tmp_path / "linear.safetensors")
    stored = file_tensors(tmp_path / "linear.safetensors")
    module = ModuleAdapter("layer", random_factors(kind, 50, 40, 4, seed=3), scaling=2.0, tau=0.5, fan_in_fan_out=False)
    base = torch.nn.Linear(40, 50)
    base.weight.data, base.bias.data = weight.float(), bias.float()
    unmerged = UnmergedLinear(base, ADAPTER_KINDS[kind](), module)
    monkeypatch.setattr(formula, "BLOCK_ELEMENTS", 3 * 40)
    streamed = streamed_modules.StreamedUnmergedLinear(
        streamed_modules.TensorPool(), unmerged, stored["w"], stored["b"]
    )
    x = torch.randn(2, 7, 40, generator=draws)  # (batch, seq, in)
    # float32 products of 17 blocks vs one: rounding moves an output of ~6 by a few 1e-6; mixed-up scales by ~0.1
    torch.testing.assert_close(streamed(x), unmerged(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_linears_streamed_in_many_row_blocks_give_the_same_verdict(
    tiny_base, adapter_dir, merged_dir, arch, monkeypatch
):
    """Every plain Linear (and the head) a few rows at a time, as at real sizes (a block per 16 MiB): the same
    greedy path and agreements as the whole model; the logit error moves only by float32 rounding."""
    monkeypatch.setattr(streamed_modules, "LINEAR_BLOCK_BYTES", 256)  # a tiny model's Linear: tens of blocks
    streamed = streamed_run(tiny_base(arch), adapter_dir(arch), merged_dir(arch), torch.float32)
    whole = whole_model_run(tiny_base(arch), adapter_dir(arch), merged_dir(arch), torch.float32)
    assert torch.equal(streamed.path, whole.path)
    assert streamed.logits.greedy_first_divergence == whole.logits.greedy_first_divergence
    assert streamed.logits.top1_agreement == whole.logits.top1_agreement == 1.0
    assert 0 < streamed.logits.relative_logit_error < Thresholds.for_dtype(torch.float32).max_relative_logit_error


@pytest.mark.slow
def test_logits_formed_a_few_positions_at_a_time_give_the_whole_models_metrics(
    tiny_base, adapter_dir, merged_dir, monkeypatch
):
    """The logit metrics tallied over blocks of 7 positions (each model's head streamed once per block, the
    last block short): the whole model's metrics, the dtype floor's too."""
    monkeypatch.setattr(verify, "LOGIT_BLOCK", 7)
    base, adapter, merged = tiny_base("llama"), adapter_dir("llama"), merged_dir("llama", torch.bfloat16)
    streamed = streamed_run(base, adapter, merged, torch.bfloat16)
    whole = whole_model_run(base, adapter, merged, torch.bfloat16)
    assert streamed.logits.positions % 7 != 0
    assert_same_metrics(streamed.logits, whole.logits)
    assert streamed.floor is not None
    assert_same_metrics(streamed.floor, whole_model_floor(base, torch.bfloat16).logits)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_bf16_comparison_and_floor_equal_the_whole_model_ones(tiny_base, adapter_dir, merged_dir, arch):
    streamed = streamed_run(tiny_base(arch), adapter_dir(arch), merged_dir(arch, torch.bfloat16), torch.bfloat16)
    whole = whole_model_run(tiny_base(arch), adapter_dir(arch), merged_dir(arch, torch.bfloat16), torch.bfloat16)
    floor = whole_model_floor(tiny_base(arch), torch.bfloat16)
    assert torch.equal(streamed.path, whole.path)
    assert any(d is not None for d in whole.logits.greedy_first_divergence)  # bf16 diverges: the inference is tested
    assert_same_metrics(streamed.logits, whole.logits)
    assert streamed.floor is not None
    assert_same_metrics(streamed.floor, floor.logits)


@pytest.mark.slow
def test_a_bf16_base_streams_like_the_whole_model(tiny_base, tmp_path):
    """A base stored in bfloat16: the float32 reference casts each tensor as it is read, the merge stays bf16."""
    base = tiny_base("llama", torch.bfloat16)
    adapter = write_random_adapter(tmp_path / "adapter", base, seed=5)
    merged = merge(base, adapter, tmp_path / "merged", progress=False).out_dir
    streamed = streamed_run(base, adapter, merged, torch.bfloat16)
    whole = whole_model_run(base, adapter, merged, torch.bfloat16)
    assert torch.equal(streamed.path, whole.path)
    assert_same_metrics(streamed.logits, whole.logits)
    assert streamed.floor is not None
    assert_same_metrics(streamed.floor, whole_model_floor(base, torch.bfloat16).logits)
