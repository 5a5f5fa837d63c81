"""Whole merges of tiny Llama / Qwen2 / GPT-2 checkpoints: the output is a standalone HF
checkpoint that loads with transformers and behaves exactly like the unmerged adapter."""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from merger.merge import PROVENANCE_NAME, merge
from service.cli import main
from tests.merger.reference import load_base_state, reference_weights
from tests.support.adapters import write_random_adapter

ARCHS = ["llama", "qwen2", "gpt2"]
SHARD = "100KB"
SHARD_BYTES = 100_000
PROMPT = "The capital of France is"


def cli_merge(base: Path, adapter: Path, out: Path, *extra: str) -> Path:
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="session", params=ARCHS)
def merged(request, tiny_base, tmp_path_factory):
    """(base, adapter, out): a multi-shard base merged through the CLI into multi-shard output."""
    arch = request.param
    base = tiny_base(arch, max_shard_size=SHARD)
    work = tmp_path_factory.mktemp(f"merged-{arch}")
    adapter = write_random_adapter(work / "adapter", base, kind="D2LORA", r=4, alpha=8, scale=0.5, seed=3)
    return base, adapter, cli_merge(base, adapter, work / "out", "--max-shard-size", SHARD)


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def test_base_and_output_are_sharded_with_an_index(merged):
    base, _, out = merged
    assert len(shard_files(base)) > 1
    shards = shard_files(out)
    assert len(shards) > 1
    assert [s.name for s in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_base_state(base))
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            assert len(list(f.keys())) == 1 or shard.stat().st_size <= SHARD_BYTES + 4096


def test_untouched_tensors_are_bit_identical(merged):
    base, adapter, out = merged
    fused = reference_weights(base, adapter)
    ours, original = load_base_state(out), load_base_state(base)
    assert set(ours) == set(original)
    for key in set(original) - set(fused):
        assert ours[key].dtype == original[key].dtype and torch.equal(ours[key], original[key]), key


def test_fused_tensors_match_the_reference(merged):
    base, adapter, out = merged
    ours = load_base_state(out)
    for key, expected in reference_weights(base, adapter).items():
        torch.testing.assert_close(ours[key].double(), expected, rtol=2e-6, atol=2e-6, msg=key)


def reference_model(base: Path, adapter: Path):
    """The unmerged adapter's function: the base model with dense Ŵ (float64 reference) loaded in place."""
    model = AutoModelForCausalLM.from_pretrained(base)
    dense = {k: v.float() for k, v in reference_weights(base, adapter).items()}
    _, unexpected = model.load_state_dict(dense, strict=False)
    assert not unexpected
    return model.eval()


def greedy(model, tokenizer, max_new_tokens: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
    return logits, tokens


def test_merged_folder_loads_and_generates_like_the_unmerged_adapter(merged):
    base, adapter, out = merged
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged_logits, merged_tokens = greedy(AutoModelForCausalLM.from_pretrained(out).eval(), tokenizer)
    ref_logits, ref_tokens = greedy(reference_model(base, adapter), tokenizer)
    base_logits, _ = greedy(AutoModelForCausalLM.from_pretrained(base).eval(), tokenizer, max_new_tokens=1)
    assert torch.equal(merged_tokens, ref_tokens)
    torch.testing.assert_close(merged_logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 0.1, "the adapter should change the model"


def test_side_files_and_provenance(merged):
    base, adapter, out = merged
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    provenance = json.loads((out / PROVENANCE_NAME).read_text())
    assert provenance["kind"] == "D2LORA" and provenance["dtype"] == "auto"
    assert provenance["adapter"] == str(adapter) and provenance["base"] == str(base)
    assert provenance["modules"] == sorted(k.removesuffix(".weight") for k in reference_weights(base, adapter))
    assert provenance["config"]["r"] == 4 and provenance["config"]["tau"] == 0.5
    assert not list(out.glob("*.bin")) and not list(out.parent.glob(".*d2lora-tmp*"))


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_option_writes_that_dtype(tiny_base, tmp_path, dtype):
    base = tiny_base("llama")
    adapter = write_random_adapter(tmp_path / "adapter", base, kind="D2LORA", scale=0.5)
    out = cli_merge(base, adapter, tmp_path / "out", "--dtype", dtype)
    ours = load_base_state(out)
    assert {t.dtype for t in ours.values()} == {DTYPES[dtype]}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == dtype and "torch_dtype" not in config
    for key, expected in reference_weights(base, adapter).items():  # cast once from fp32: within one rounding
        torch.testing.assert_close(
            ours[key], expected.to(DTYPES[dtype]), rtol=torch.finfo(DTYPES[dtype]).eps, atol=1e-6
        )
    assert AutoModelForCausalLM.from_pretrained(out).dtype == DTYPES[dtype]


def test_bf16_base_stays_bf16_with_auto(tiny_base, tmp_path):
    base = tiny_base("llama", dtype=torch.bfloat16)
    adapter = write_random_adapter(tmp_path / "adapter", base, kind="DORA", scale=0.5)
    out = cli_merge(base, adapter, tmp_path / "out")
    ours = load_base_state(out)
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    for key, expected in reference_weights(base, adapter).items():
        torch.testing.assert_close(
            ours[key], expected.to(torch.bfloat16), rtol=torch.finfo(torch.bfloat16).eps, atol=1e-6
        )


def pack(folder: Path, dest: Path) -> Path:
    if dest.name.endswith(".zip"):
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for file in sorted(folder.iterdir()):
                zf.write(file, file.name)
    else:
        with tarfile.open(dest, f"w:{dest.name.rpartition('.tar')[2].lstrip('.')}") as tar:
            tar.add(folder, arcname="my-adapter")
    return dest


@pytest.mark.parametrize(
    "archive", ["adapter.tar.gz", "adapter.zip", "adapter.tar", "adapter.tar.bz2", "adapter.tar.xz"]
)
def test_archives_give_the_same_output_as_the_folder(tiny_base, tmp_path, archive):
    base = tiny_base("gpt2")
    adapter = write_random_adapter(tmp_path / "adapter", base, kind="LORA", scale=0.5)
    from_folder = cli_merge(base, adapter, tmp_path / "from-folder")
    from_archive = cli_merge(base, pack(adapter, tmp_path / archive), tmp_path / "from-archive")
    for ours, theirs in zip(shard_files(from_archive), shard_files(from_folder), strict=True):
        assert ours.read_bytes() == theirs.read_bytes()


def test_progress_bar_only_when_asked_or_on_a_terminal(tiny_base, tmp_path, capsys):
    base = tiny_base("llama")
    adapter = write_random_adapter(tmp_path / "adapter", base)
    merge(base, adapter, tmp_path / "quiet")  # pytest's stderr is not a terminal
    assert "merge" not in capsys.readouterr().err
    merge(base, adapter, tmp_path / "shown", progress=True)
    assert "merge: 100%" in capsys.readouterr().err


def test_out_dir_parent_is_created(tiny_base, tmp_path):
    base = tiny_base("llama")
    adapter = write_random_adapter(tmp_path / "adapter", base)
    result = merge(base, adapter, tmp_path / "a" / "b" / "out")
    assert result.out_dir.is_dir() and result.fused_modules == 8
    shutil.rmtree(tmp_path / "a")
