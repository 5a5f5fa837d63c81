"""The per-request form (A, B̃, d) gives the merged weight's output: d ⊙ (W0 x) + B̃ A x == Ŵ x, for every kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merger.checkpoint import CheckpointReader
from merger.config import AdapterConfig
from merger.formula import lora_scaling
from merger.merge import merge
from merger.per_request import PROVENANCE_NAME, ROW_SCALE_NAME, read_row_scales, write_per_request_form
from tests.support.adapters import write_random_adapter

PREFIX = "base_model.model."
# case -> (architecture, kind, extra adapter_config fields)
CASES = {
    "llama-d2lora": ("llama", "D2LORA", {}),
    "llama-lora": ("llama", "LORA", {}),
    "llama-dora": ("llama", "DORA", {}),
    "gpt2-d2lora": ("gpt2", "D2LORA", {}),
    "gpt2-lora": ("gpt2", "LORA", {}),
    "gpt2-dora": ("gpt2", "DORA", {}),
    "llama-d2lora-patterns": (
        "llama",
        "D2LORA",
        {"rank_pattern": {"v_proj": 2, "model.layers.1.self_attn.q_proj": 3}, "alpha_pattern": {"o_proj": 3}},
    ),
    "llama-dora-patterns-rslora": ("llama", "DORA", {"rank_pattern": {"k_proj": 2}, "use_rslora": True}),
    "qwen2-d2lora-mlp": ("qwen2", "D2LORA", {"target_modules": ["q_proj", "gate_proj", "down_proj"]}),
}
RELATIVE = 1e-6


@pytest.fixture(scope="module")
def forms(tiny_base, tmp_path_factory):
    """Factory: case -> (base, adapter, merged checkpoint, per-request folder), built once per module."""
    made = {}

    def build(case: str):
        if case not in made:
            arch, kind, extra = CASES[case]
            root = tmp_path_factory.mktemp(case)
            base = tiny_base(arch)
            adapter = write_random_adapter(root / "adapter", base, kind=kind, r=4, seed=7, scale=0.3, **extra)
            merge(base, adapter, root / "merged", progress=False)
            write_per_request_form(base, adapter, root / "per-request")
            made[case] = (base, adapter, root / "merged", root / "per-request")
        return made[case]

    return build


def torch_layout(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return weight.T if fan_in_fan_out else weight  # (out, in)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("case", CASES)
def test_row_scaled_low_rank_equals_the_merged_weight(forms, case):
    base, adapter, merged, folder = forms(case)
    config = json.loads((adapter / "adapter_config.json").read_text())
    flip = config["fan_in_fan_out"]
    factors, scales = load_file(folder / "adapter_model.safetensors"), read_row_scales(folder)
    modules = json.loads((merged / "d2lora_merge.json").read_text())["modules"]
    base_reader, merged_reader = CheckpointReader(base), CheckpointReader(merged)
    gen = torch.Generator().manual_seed(0)
    for path in modules:
        w0 = torch_layout(base_reader.read(f"{path}.weight"), flip).double()  # (out, in)
        fused = torch_layout(merged_reader.read(f"{path}.weight"), flip).double()  # Ŵ (out, in)
        a = factors[f"{PREFIX}{path}.lora_A.weight"].double()  # (k, in)
        b = factors[f"{PREFIX}{path}.lora_B.weight"].double()  # (out, k): B̃
        d = scales.get(path, torch.ones(w0.shape[0])).double()  # (out,)
        x = torch.randn(5, w0.shape[1], generator=gen, dtype=torch.float64)  # (tokens, in)
        got = d * (x @ w0.T) + (x @ a.T) @ b.T  # (tokens, out)
        assert relative_error(got, x @ fused.T) <= RELATIVE, path
        assert not torch.equal(fused, w0), f"{path}: the merge changed nothing"


@pytest.mark.parametrize("case", CASES)
def test_folder_is_a_rank_k_lora_adapter_with_scaling_one(forms, case):
    _, adapter, merged, folder = forms(case)
    _, kind, _ = CASES[case]
    source = AdapterConfig.from_dict(json.loads((adapter / "adapter_config.json").read_text()))
    config = AdapterConfig.from_dict(json.loads((folder / "adapter_config.json").read_text()))
    assert (config.kind, config.use_rslora) == ("LORA", False)
    factors = load_file(folder / "adapter_model.safetensors")
    modules = json.loads((merged / "d2lora_merge.json").read_text())["modules"]
    assert {k.removeprefix(PREFIX).rsplit(".", 2)[0] for k in factors} == set(modules)
    for path in modules:
        k = factors[f"{PREFIX}{path}.lora_A.weight"].shape[0]
        assert k == source.rank_for(path) * (2 if kind == "D2LORA" else 1), path
        assert config.rank_for(path) == k and lora_scaling(config.alpha_for(path), k) == 1.0, path
    assert all(t.dtype == torch.float32 for t in factors.values())


@pytest.mark.parametrize("case", ["llama-d2lora", "llama-lora", "llama-dora"])
def test_row_scales_are_written_only_where_they_are_not_one(forms, case):
    _, _, merged, folder = forms(case)
    modules = json.loads((merged / "d2lora_merge.json").read_text())["modules"]
    provenance = json.loads((folder / PROVENANCE_NAME).read_text())
    if CASES[case][1] == "LORA":
        assert not (folder / ROW_SCALE_NAME).exists() and provenance["row_scaled"] == []
        return
    scales = read_row_scales(folder)
    assert sorted(scales) == sorted(modules) == provenance["row_scaled"]
    assert all(d.dtype == torch.float32 and not bool((d == 1).all()) for d in scales.values())


def test_row_scale_is_the_merges_own(forms):
    """d is bit for bit the scale the merge applied: Ŵ − c·ΔW over W0 + ΔW, row by row, in float64."""
    base, adapter, merged, folder = forms("llama-dora")
    path = "model.layers.0.self_attn.q_proj"
    factors = load_file(adapter / "adapter_model.safetensors")
    a, b = factors[f"{PREFIX}{path}.lora_A.weight"], factors[f"{PREFIX}{path}.lora_B.weight"]
    w0 = CheckpointReader(base).read(f"{path}.weight")
    adapted = w0 + lora_scaling(8, 4) * (b @ a)  # (out, in)
    fused = CheckpointReader(merged).read(f"{path}.weight")
    d = read_row_scales(folder)[path]
    torch.testing.assert_close(fused, d.reshape(-1, 1) * adapted, rtol=1e-6, atol=1e-7)


def test_an_adapter_object_is_accepted(forms, tmp_path):
    from merger.artifact import Adapter

    base, adapter, _, folder = forms("llama-d2lora")
    result = write_per_request_form(base, Adapter.load(adapter), tmp_path / "again")
    assert (result.modules, result.rank, result.row_scaled_modules) == (8, 8, 8)
    for name in ("adapter_model.safetensors", ROW_SCALE_NAME):
        ours, theirs = load_file(tmp_path / "again" / name), load_file(folder / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_output_is_written_atomically(forms, tmp_path):
    from merger.merge import MergeError

    base, adapter, _, _ = forms("llama-d2lora")
    (tmp_path / "taken").mkdir()
    with pytest.raises(MergeError, match="already exists"):
        write_per_request_form(base, adapter, tmp_path / "taken")
    assert list((tmp_path / "taken").iterdir()) == []


def test_adapter_for_another_base_is_refused_before_writing(forms, tiny_base, tmp_path):
    from merger.archive import ArtifactError

    _, adapter, _, _ = forms("gpt2-d2lora")
    with pytest.raises(ArtifactError, match="no such module in the base model"):
        write_per_request_form(tiny_base("llama"), adapter, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_row_scale_file_is_one_error(forms, tmp_path):
    import shutil

    from merger.per_request import PerRequestError

    _, _, _, folder = forms("llama-d2lora")
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    (copy / ROW_SCALE_NAME).write_bytes(b"not safetensors")
    with pytest.raises(PerRequestError, match="unreadable"):
        read_row_scales(copy)
