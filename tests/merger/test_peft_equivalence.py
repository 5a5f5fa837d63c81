"""Artifacts written by PEFT itself merge to exactly what PEFT's own merge_and_unload gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from merger.merge import merge
from tests.merger.reference import load_base_state
from tests.support.tiny import TARGETS

CASES = {
    "llama-lora": ("llama", {}),
    "llama-dora": ("llama", {"use_dora": True}),
    "llama-rslora": ("llama", {"use_rslora": True}),
    "llama-patterns": (
        "llama",
        {
            "rank_pattern": {"v_proj": 4, "model.layers.1.self_attn.q_proj": 2},
            "alpha_pattern": {"o_proj": 3, "k_proj": 40},
        },
    ),
    "llama-layers-to-transform": ("llama", {"layers_to_transform": [1]}),
    "llama-layers-pattern": ("llama", {"layers_to_transform": 0, "layers_pattern": "layers", "use_dora": True}),
    "llama-exclude-list": ("llama", {"exclude_modules": ["model.layers.0.self_attn.k_proj"]}),
    "llama-exclude-regex": ("llama", {"exclude_modules": r".*layers\.1\.self_attn\.(v|o)_proj"}),
    "qwen2-dora-all-linear": ("qwen2", {"use_dora": True, "target_modules": "all-linear"}),
    "gpt2-lora": ("gpt2", {"fan_in_fan_out": True}),
    "gpt2-dora": ("gpt2", {"fan_in_fan_out": True, "use_dora": True}),
}


def randomize_adapter(model, seed: int) -> None:
    """PEFT initialises B = 0 (a no-op update): make B and DoRA's magnitude random."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=gen))


@pytest.fixture(scope="session")
def peft_case(tiny_base, tmp_path_factory):
    """Factory: case -> (base, adapter folder saved by PEFT, PEFT's merge_and_unload state dict)."""
    made = {}

    def build(case: str):
        if case not in made:
            arch, extra = CASES[case]
            base, folder = tiny_base(arch), tmp_path_factory.mktemp(case) / "adapter"
            config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": TARGETS[arch], **extra})
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
            randomize_adapter(model, seed=len(made))
            model.save_pretrained(folder)
            merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
            made[case] = (base, folder, merged)
        return made[case]

    return build


def assert_matches_peft(out: Path, base: Path, peft_merged: dict[str, torch.Tensor]) -> None:
    ours, original = load_base_state(out), load_base_state(base)
    changed = [k for k in ours if not torch.equal(ours[k], original[k])]
    assert changed, "the merge changed nothing"
    assert set(ours) <= set(peft_merged)
    for key, tensor in ours.items():
        torch.testing.assert_close(tensor, peft_merged[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_peft_merge_and_unload(peft_case, tmp_path, case):
    base, adapter, peft_merged = peft_case(case)
    merge(base, adapter, tmp_path / "out")
    assert_matches_peft(tmp_path / "out", base, peft_merged)


def test_peft_names_the_dora_magnitude_without_weight_suffix(peft_case):
    _, adapter, _ = peft_case("llama-dora")
    names = load_file(adapter / "adapter_model.safetensors")
    magnitudes = [k for k in names if "magnitude" in k]
    assert magnitudes and all(k.endswith(".lora_magnitude_vector") for k in magnitudes)


def test_dora_magnitude_with_weight_suffix_merges_the_same(peft_case, tmp_path):
    """Older PEFT releases wrote `lora_magnitude_vector.weight`: the alias gives the same merge."""
    base, adapter, peft_merged = peft_case("llama-dora")
    renamed = tmp_path / "adapter"
    renamed.mkdir()
    (renamed / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file(
        {k + ".weight" if k.endswith("lora_magnitude_vector") else k: v for k, v in tensors.items()},
        renamed / "adapter_model.safetensors",
    )
    merge(base, renamed, tmp_path / "out")
    assert_matches_peft(tmp_path / "out", base, peft_merged)
