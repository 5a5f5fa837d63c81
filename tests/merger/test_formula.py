"""merger.formula and the adapter kinds against the independent float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merger import formula
from merger.artifact import Adapter
from merger.checkpoint import CheckpointReader
from merger.formula import FusionError, lora_scaling
from merger.kinds import ADAPTER_KINDS, ModuleAdapter
from tests.merger.reference import reference_fuse
from tests.support.adapters import random_factors, write_random_adapter

MODULE = "model.layers.3.self_attn.q_proj"
OUT, IN, R = 24, 16, 4


def stored_weight(out: int, inp: int, dtype: torch.dtype, fan_in_fan_out: bool, seed: int = 1) -> torch.Tensor:
    w0 = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)).to(dtype)  # (out, in)
    return w0.T.contiguous() if fan_in_fan_out else w0


def fuse(kind: str, w0: torch.Tensor, factors, scaling: float, tau: float = 0.5, fan_in_fan_out: bool = False):
    module = ModuleAdapter(MODULE, factors, scaling, tau, fan_in_fan_out)
    return ADAPTER_KINDS[kind]().fuse(w0, module)


@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kind", ["D2LORA", "LORA", "DORA"])
def test_fuse_matches_the_reference(kind, dtype, fan_in_fan_out):
    w0 = stored_weight(OUT, IN, dtype, fan_in_fan_out)
    factors = {name: t.to(dtype) for name, t in random_factors(kind, OUT, IN, R, seed=2).items()}
    fused = fuse(kind, w0, factors, scaling=2.0, tau=0.7, fan_in_fan_out=fan_in_fan_out)
    expected = reference_fuse(w0, factors, kind, scaling=2.0, tau=0.7, fan_in_fan_out=fan_in_fan_out)
    assert fused.dtype == torch.float32 and fused.shape == w0.shape
    torch.testing.assert_close(fused.double(), expected, rtol=2e-6, atol=2e-6)


def test_the_update_is_not_lost():
    w0 = stored_weight(OUT, IN, torch.float32, False)
    fused = fuse("D2LORA", w0, random_factors("D2LORA", OUT, IN, R, seed=3), scaling=2.0)
    assert (fused - w0).abs().max() > 0.1


def test_d2lora_keeps_base_row_norms_before_the_residual():
    """W* = Ŵ − ΔW has W0's row norms; with τ = 1 and equal factors ΔW = 0 and Ŵ = W0."""
    w0 = stored_weight(OUT, IN, torch.float32, False)
    factors = random_factors("D2LORA", OUT, IN, R, seed=4)
    factors["lora_A_neg.weight"], factors["lora_B_neg.weight"] = factors["lora_A.weight"], factors["lora_B.weight"]
    torch.testing.assert_close(fuse("D2LORA", w0, factors, scaling=2.0, tau=1.0), w0)


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 12),
    inp=st.integers(1, 12),
    r=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    tau=st.floats(0, 2),
    scaling=st.floats(0.1, 4),
)
def test_d2lora_matches_the_reference_for_any_shape(out, inp, r, seed, tau, scaling):
    w0 = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) + 0.1
    factors = random_factors("D2LORA", out, inp, r, seed)
    expected = reference_fuse(w0, factors, "D2LORA", scaling, tau)
    torch.testing.assert_close(fuse("D2LORA", w0, factors, scaling, tau).double(), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 12),
    inp=st.integers(1, 12),
    k=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    scaling=st.floats(0.1, 4),
)
def test_the_training_layers_row_norm_equals_the_dense_one(out, inp, k, seed, scaling):
    """n′ from W0 Aᵀ and A Aᵀ (what the trainer uses every step) equals ‖W0 + s·B A‖_row formed densely."""
    g = torch.Generator().manual_seed(seed)
    w0, a, b = (
        torch.randn(out, inp, generator=g) + 0.1,
        torch.randn(k, inp, generator=g),
        torch.randn(out, k, generator=g),
    )
    dense = formula.adapted_row_norm(w0, formula.low_rank_delta(a, b, scaling))
    low_rank = formula.low_rank_adapted_row_norm(w0, formula.row_norm(w0), a, b, scaling)
    torch.testing.assert_close(low_rank, dense, rtol=1e-5, atol=1e-5)


def test_rslora_scaling_value():
    assert lora_scaling(16, 4) == 4.0
    assert lora_scaling(16, 4, use_rslora=True) == 8.0


@pytest.mark.parametrize("use_rslora", [False, True])
def test_artifact_scaling_reaches_the_fused_weight(tiny_base, tmp_path, use_rslora):
    base = tiny_base("llama")
    adapter_dir = write_random_adapter(tmp_path / "a", base, r=4, alpha=16, use_rslora=use_rslora, scale=0.2)
    reader = CheckpointReader(base)
    module = Adapter.load(adapter_dir).bind(reader.shapes())[0]
    expected_scaling = 16 / math.sqrt(4) if use_rslora else 16 / 4
    assert module.scaling == expected_scaling
    w0 = reader.read(module.weight_key)
    expected = reference_fuse(w0, module.factors, "D2LORA", expected_scaling, tau=0.5)
    torch.testing.assert_close(ADAPTER_KINDS["D2LORA"]().fuse(w0, module).double(), expected, rtol=2e-6, atol=2e-6)
    reader.close()


@pytest.mark.parametrize("kind", ["D2LORA", "LORA", "DORA"])
def test_a_kind_says_whether_it_has_a_row_scale(kind):
    """has_row_scale lets the checks skip forming ΔW for plain LoRA: it must say what row_scale does."""
    w0, adapter_kind = torch.randn(OUT, IN), ADAPTER_KINDS[kind]()
    module = ModuleAdapter(MODULE, random_factors(kind, OUT, IN, R, seed=4), 1.0, 0.5, False)
    scale = adapter_kind.row_scale(w0, adapter_kind.delta(module), module)
    assert adapter_kind.has_row_scale == (scale is not None)
    assert (adapter_kind.blocked_row_scale(w0, module) is None) == (scale is None)


@pytest.mark.parametrize("block_rows", [OUT, 5], ids=["one-block", "row-7-in-block-2"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("kind", ["D2LORA", "DORA"])
def test_zero_norm_row_is_an_error_naming_the_module(kind, fan_in_fan_out, block_rows, monkeypatch):
    """The row is numbered in the whole weight, also when the fuse forms it in blocks of rows."""
    monkeypatch.setattr(formula, "BLOCK_ELEMENTS", block_rows * IN)
    w0 = torch.randn(OUT, IN)
    factors = random_factors(kind, OUT, IN, R, seed=5)
    w0[7] = 0
    for name in ("lora_B.weight", "lora_B_neg.weight"):
        if name in factors:
            factors[name][7] = 0
    stored = w0.T.contiguous() if fan_in_fan_out else w0
    with pytest.raises(FusionError, match=rf"{MODULE}: adapted weight has zero norm in rows \[7\]"):
        fuse(kind, stored, factors, scaling=1.0, fan_in_fan_out=fan_in_fan_out)


@pytest.mark.parametrize("kind", ["D2LORA", "LORA", "DORA"])
def test_non_finite_fused_weight_is_an_error_naming_the_module(kind):
    w0 = torch.randn(OUT, IN)
    factors = random_factors(kind, OUT, IN, R, seed=6)
    factors["lora_B.weight"][2] = 1e30  # ΔW overflows fp32
    with pytest.raises(FusionError, match=rf"{MODULE}.*non-finite"):
        fuse(kind, w0, factors, scaling=1e10)


def test_non_finite_base_weight_is_an_error_naming_the_module():
    w0 = torch.randn(OUT, IN)
    w0[0, 0] = float("nan")
    with pytest.raises(FusionError, match=MODULE):
        fuse("D2LORA", w0, random_factors("D2LORA", OUT, IN, R, seed=7), scaling=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["D2LORA", "LORA", "DORA"])
def test_the_row_scale_formed_a_block_of_rows_at_a_time_is_the_whole_ones(kind, dtype, monkeypatch):
    """blocked_row_scale (what verification uses, no (out, in) ΔW) over 5 blocks, the last one short: the row
    scale the fuse computes from the whole ΔW, to float32 rounding."""
    w0 = stored_weight(OUT, IN, dtype, fan_in_fan_out=False)  # (out, in)
    module = ModuleAdapter(MODULE, random_factors(kind, OUT, IN, R, seed=4), 2.0, 0.5, False)
    strategy = ADAPTER_KINDS[kind]()
    monkeypatch.setattr(formula, "BLOCK_ELEMENTS", 5 * IN)  # 5 rows a block: 4 blocks of 5 and one of 4
    assert len(formula.row_slices(w0)) == 5 and formula.row_slices(w0)[-1] == slice(20, 24)
    blocked = strategy.blocked_row_scale(w0, module)
    whole = strategy.row_scale(w0.float(), strategy.delta(module), module)
    if kind == "LORA":
        assert blocked is None and whole is None
    else:
        assert blocked is not None and whole is not None and blocked.shape == (OUT, 1)
        torch.testing.assert_close(blocked, whole, rtol=1e-6, atol=0)
