"""`fuse_into_file`: only the targeted tensors, exactly the merge's, written atomically; progress bars per layer."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from merger import formula
from merger.checkpoint import CheckpointError, CheckpointReader, ShardWriter, TensorSpec
from merger.formula import FusionError
from merger.fs import TMP_MARKER
from merger.merge import fuse_into_file, merge
from merger.verify import verify


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_the_fused_file_holds_exactly_the_merges_adapted_tensors(tiny_base, adapter_dir, tmp_path, arch, dtype):
    base, adapter = tiny_base(arch), adapter_dir(arch)
    merged = merge(base, adapter, tmp_path / "merged", dtype=dtype, progress=False).out_dir
    result = fuse_into_file(base, adapter, tmp_path / "fused.safetensors", dtype=dtype)
    fused = load_file(result.out_file)
    with CheckpointReader(merged) as reader:
        changed = {name for name in reader.tensors if name.endswith(".weight") and name.rsplit(".", 2)[-2] in
                   ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj")}  # fmt: skip
        assert set(fused) == changed and result.fused_modules == len(changed)
        for name, tensor in fused.items():
            assert torch.equal(tensor, reader.read(name)), name
    assert [p.name for p in tmp_path.iterdir() if TMP_MARKER in p.name] == []


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_a_weight_fused_a_block_of_rows_at_a_time_is_the_one_fused_whole(
    tiny_base, adapter_dir, tmp_path, monkeypatch, arch, dtype
):
    """Ŵ is formed and written a few rows at a time (Llama: 5 of 128 input features; GPT-2: 10 of 64), the last
    block short: the same tensors, within two units in the last place of its largest entry.  On an Intel CPU they are
    bit for bit the same; on an AMD EPYC oneMKL's SGEMM rounds a row of B A differently with the number of
    rows it is given (either kernel branch), so a block's ΔW row can differ from the whole one's in its last bit."""
    base, adapter = tiny_base(arch), adapter_dir(arch)
    whole = load_file(fuse_into_file(base, adapter, tmp_path / "whole.safetensors", dtype=dtype).out_file)
    monkeypatch.setattr(formula, "BLOCK_ELEMENTS", 5 * 128)
    blocked = load_file(fuse_into_file(base, adapter, tmp_path / "blocked.safetensors", dtype=dtype).out_file)
    assert whole.keys() == blocked.keys()
    for name in whole:
        last_place = torch.finfo(whole[name].dtype).eps * whole[name].abs().max().item()  # of the largest entry
        torch.testing.assert_close(blocked[name], whole[name], rtol=0, atol=2 * last_place)


@pytest.mark.parametrize("rows", [[2, 1], [2, 2, 1]], ids=["too-few", "too-many"])
def test_a_tensor_written_in_blocks_of_rows_must_fill_its_spec(tmp_path, rows):
    spec = TensorSpec("w", "F32", (4, 3))
    with pytest.raises(CheckpointError, match="rows"), ShardWriter(tmp_path / "shard.safetensors", [spec]) as writer:
        writer.write_rows("w", (torch.zeros(n, 3) for n in rows))


def test_a_failing_fuse_leaves_the_old_file_and_no_temporary(tiny_base, adapter_dir, tmp_path):
    """Ŵ overflows float16 half-way: the error names the module; what was at out_file is still there."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    source = adapter_dir("llama")
    (adapter / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    tensors = load_file(source / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].mul_(1e7)
    save_file(tensors, adapter / "adapter_model.safetensors")
    out = tmp_path / "fused.safetensors"
    out.write_bytes(b"the previous file")
    with pytest.raises(FusionError, match="layers.1.self_attn.v_proj.*float16"):
        fuse_into_file(tiny_base("llama"), adapter, out, dtype="float16")
    assert out.read_bytes() == b"the previous file"
    assert [p.name for p in tmp_path.iterdir() if TMP_MARKER in p.name] == []


def test_verify_from_a_fused_file_over_the_base(tiny_base, adapter_dir, tmp_path):
    fused = fuse_into_file(tiny_base("llama"), adapter_dir("llama"), tmp_path / "fused.safetensors").out_file
    report = verify(tiny_base("llama"), adapter_dir("llama"), fused=fused)
    assert report.passed, report.summary()
    assert report.merged == str(fused) and report.max_untouched_abs_diff == 0.0


def test_merge_and_verify_show_a_bar_per_layer_on_a_terminal_only(tiny_base, adapter_dir, tmp_path, capsys):
    base, adapter = tiny_base("llama"), adapter_dir("llama")  # 2 decoder layers, plus the tensors outside them
    merge(base, adapter, tmp_path / "merged", progress=True)
    verify(base, adapter, progress=True)
    err = capsys.readouterr().err
    passes = 32 + 1 + 1  # a decode step per token, one more for the last token's logits, one teacher-forced pass
    assert re.search(r"merge: 100%.* 3/3 ", err) and re.search(rf"verify: 100%.* {2 * passes}/{2 * passes} ", err), err
    merge(base, adapter, tmp_path / "again", progress=None)  # pytest's stderr is not a terminal
    assert "merge:" not in capsys.readouterr().err
