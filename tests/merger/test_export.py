"""`d2lora export --format peft-dora`: PEFT's own merge_and_unload of the export gives the merger's Ŵ."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from merger.fs import TMP_MARKER
from merger.merge import merge
from service.cli import main
from tests.merger.reference import load_base_state
from tests.support.adapters import write_random_adapter

CASES = {
    "llama-d2lora": ("llama", "D2LORA", {}),
    "llama-lora": ("llama", "LORA", {}),
    "llama-dora": ("llama", "DORA", {}),
    "gpt2-d2lora": ("gpt2", "D2LORA", {}),
    "gpt2-dora": ("gpt2", "DORA", {}),
    "llama-d2lora-patterns-rslora": (
        "llama",
        "D2LORA",
        {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3}, "use_rslora": True},
    ),
    "qwen2-d2lora-mlp": ("qwen2", "D2LORA", {"target_modules": ["q_proj", "gate_proj", "down_proj"]}),
}


def run_export(capsys, base: Path, adapter: Path, out: Path, fmt: str = "peft-dora") -> tuple[int, str]:
    code = main(["export", "--format", fmt, "--base", str(base), "--adapter", str(adapter), "--out", str(out)])
    return code, capsys.readouterr().err


def peft_merge(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("case", CASES)
def test_peft_merges_the_dora_export_to_the_merged_weight(capsys, tiny_base, tmp_path, case):
    arch, kind, extra = CASES[case]
    base = tiny_base(arch)
    adapter = write_random_adapter(tmp_path / "adapter", base, kind=kind, r=4, seed=11, scale=0.3, **extra)
    merge(base, adapter, tmp_path / "merged", progress=False)
    code, err = run_export(capsys, base, adapter, tmp_path / "dora")
    assert code == 0, err
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["use_dora"], config["use_rslora"]) == ("LORA", True, False)

    ours, original, theirs = (
        load_base_state(tmp_path / "merged"),
        load_base_state(base),
        peft_merge(base, tmp_path / "dora"),
    )
    changed = [k for k in ours if not torch.equal(ours[k], original[k])]
    assert changed, "the merge changed nothing"
    for key in changed:
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-5, atol=1e-6, msg=key)
    assert all(torch.equal(theirs[k], original[k]) for k in ours if k not in changed and k in theirs)


def test_export_names_every_dora_tensor_as_peft_does(capsys, tiny_base, tmp_path):
    base = tiny_base("llama")
    adapter = write_random_adapter(tmp_path / "adapter", base, kind="D2LORA", r=4, seed=1)
    assert run_export(capsys, base, adapter, tmp_path / "dora")[0] == 0
    tensors = load_file(tmp_path / "dora" / "adapter_model.safetensors")
    suffixes = {re.sub(r".*\.(lora_\w+)(\.weight)?$", r"\1", k) for k in tensors}
    assert suffixes == {"lora_A", "lora_B", "lora_magnitude_vector"}
    path = "base_model.model.model.layers.0.self_attn.q_proj"
    assert tensors[f"{path}.lora_A.weight"].shape == (8, 128)  # rank k = 2r
    assert tensors[f"{path}.lora_magnitude_vector"].shape == (128,)


def test_per_request_format_from_the_cli(capsys, tiny_base, tmp_path):
    from merger.per_request import ROW_SCALE_NAME

    base = tiny_base("llama")
    adapter = write_random_adapter(tmp_path / "adapter", base, kind="DORA", r=4, seed=2)
    code, err = run_export(capsys, base, adapter, tmp_path / "form", fmt="per-request")
    assert code == 0, err
    assert {p.name for p in (tmp_path / "form").iterdir()} >= {"adapter_config.json", ROW_SCALE_NAME}


def assert_refused(capsys, base: Path, adapter: Path, out: Path, message: str) -> None:
    code, err = run_export(capsys, base, adapter, out)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("d2lora export: error: "), err
    assert re.search(message, err), err
    assert not [p for p in out.parent.iterdir() if TMP_MARKER in p.name]


def test_a_zero_row_scale_cannot_be_a_dora_adapter(capsys, tiny_base, tmp_path):
    """A DoRA magnitude of 0 in a row makes d = 0 there: merging works, a DoRA export cannot express it."""
    base = tiny_base("llama")
    adapter = write_random_adapter(tmp_path / "adapter", base, kind="DORA", r=4, seed=3)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    module = "model.layers.1.self_attn.v_proj"
    tensors[f"base_model.model.{module}.lora_magnitude_vector"][5] = 0.0
    save_file(tensors, weights)
    assert_refused(capsys, base, adapter, tmp_path / "out", rf"{module}: row scale is zero in rows \[5\]")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_left_alone(capsys, tiny_base, tmp_path):
    base = tiny_base("llama")
    adapter = write_random_adapter(tmp_path / "adapter", base, kind="LORA", r=4, seed=4)
    (tmp_path / "out").mkdir()
    assert_refused(capsys, base, adapter, tmp_path / "out", "already exists")
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_adapter_is_one_line(capsys, tiny_base, tmp_path):
    assert_refused(capsys, tiny_base("llama"), tmp_path / "nope", tmp_path / "out", "nope")


def test_unknown_format_is_refused_by_the_parser(capsys, tiny_base, tmp_path):
    shutil.rmtree(tmp_path, ignore_errors=True)
    with pytest.raises(SystemExit) as exit_info:
        run_export(capsys, tiny_base("llama"), tmp_path / "adapter", tmp_path / "out", fmt="gguf")
    assert exit_info.value.code == 2
    assert "invalid choice: 'gguf'" in capsys.readouterr().err
