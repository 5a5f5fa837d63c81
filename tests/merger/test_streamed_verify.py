"""The streamed `d2lora verify` against its whole-model oracle (tests/support/oracle.py): the same numbers."""

from __future__ import annotations

import pytest
import torch

from merger.merge import merge
from merger.probes import NEW_TOKENS
from tests.support.adapters import write_random_adapter
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
