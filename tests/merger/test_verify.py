"""Unmerged forward and `d2lora verify`: merged checkpoints are proven equal to the adapter they came from."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from merger import formula
from merger.artifact import Adapter
from merger.checkpoint import CheckpointReader
from merger.demo import build_demo_model
from merger.report import ThresholdError, Thresholds
from merger.unmerged import UnmergedLinear, load_unmerged, model_shapes
from merger.verify import verify
from service.cli import main
from service.settings import get_settings
from tests.support.adapters import write_random_adapter

KINDS = ("D2LORA", "LORA", "DORA")
PROBE_IDS = torch.tensor([[5, 17, 40, 99, 200, 3, 8, 61], [12, 7, 250, 31, 9, 77, 140, 2]])  # (batch, seq)


@pytest.fixture(scope="session")
def demo_base():
    return build_demo_model(get_settings().cache_dir)


@pytest.fixture(scope="session")
def demo_adapter(demo_base, tmp_path_factory):
    return write_random_adapter(
        tmp_path_factory.mktemp("demo-adapter"), demo_base, "D2LORA", r=8, alpha=16, seed=1, relative_size=0.05
    )


def dense_merged_model(base_dir, adapter: Adapter) -> torch.nn.Module:
    """The base with every targeted weight replaced by the kind's fused Ŵ, in memory."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    for module in adapter.bind(model_shapes(model)):
        layer = model.get_submodule(module.path)
        layer.weight.data = adapter.kind.fuse(layer.weight.data, module)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=PROBE_IDS).logits  # (batch, seq, vocab)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", KINDS)
def test_unmerged_forward_equals_dense_merged_forward(tiny_base, adapter_dir, arch, kind):
    adapter = Adapter.load(adapter_dir(arch, kind))
    unmerged = load_unmerged(tiny_base(arch), adapter)
    dense = dense_merged_model(tiny_base(arch), adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_base(arch), dtype=torch.float32).eval()
    reference = logits(unmerged)
    assert sum(isinstance(m, UnmergedLinear) for m in unmerged.modules()) == len(adapter.modules)
    torch.testing.assert_close(logits(dense), reference, rtol=0, atol=1e-4)
    assert (logits(base) - reference).abs().max() > 0.1  # the adapter really changes the model


@pytest.mark.parametrize("kind", KINDS)
def test_recomputed_row_scale_gives_the_cached_outputs(tiny_base, adapter_dir, kind):
    adapter = Adapter.load(adapter_dir("llama", kind))
    cached = load_unmerged(tiny_base("llama"), adapter)
    recomputed = load_unmerged(tiny_base("llama"), adapter, recompute_scale=True)
    assert all(m.recompute_scale for m in recomputed.modules() if isinstance(m, UnmergedLinear))
    torch.testing.assert_close(logits(recomputed), logits(cached), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])  # bf16: + dtype floor
def test_verify_passes_on_a_faithful_merge(tiny_base, adapter_dir, arch, dtype):
    report = verify(tiny_base(arch), adapter_dir(arch, "D2LORA"), dtype=dtype)
    assert report.passed, report.summary()
    assert report.merged_dtype == dtype and report.reference_dtype == "float32"
    assert len(report.weight_errors) == len(Adapter.load(adapter_dir(arch, "D2LORA")).modules)
    if dtype == "float32":
        assert report.logits.greedy_agreement == 1.0 and report.logits.relative_logit_error <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_passes_on_the_demo_model(demo_base, demo_adapter, dtype):
    report = verify(demo_base, demo_adapter, dtype=dtype)
    assert report.passed, report.summary()
    assert report.probes == 8 and (dtype == "float32") == (report.dtype_floor is None)


def test_verify_fails_when_the_merged_folder_holds_another_adapter(tiny_base, adapter_dir, merged_llama, tmp_path):
    other = adapter_dir("llama", "D2LORA", seed=7)
    report = verify(tiny_base("llama"), other, merged_dir=merged_llama)
    assert not report.passed
    assert any("weight_error" in reason for reason in report.failures)
    assert (
        main(["verify", "--base", str(tiny_base("llama")), "--adapter", str(other), "--merged", str(merged_llama)]) == 1
    )


def _tamper(merged_dir, dst, tensor_name: str, amount: float, element: int = 0):
    """A copy of the merged folder with one element of one tensor changed in place (the header untouched)."""
    shutil.copytree(merged_dir, dst)
    with CheckpointReader(dst) as reader:
        stored = reader.tensors[tensor_name]
        value = reader.read(tensor_name).reshape(-1)[element : element + 1] + amount  # (1,), stored dtype
    with open(stored.file, "r+b") as f:
        f.seek(stored.offset + element * value.element_size())
        f.write(value.numpy().tobytes())
    return dst


@pytest.mark.parametrize(
    ("tensor_name", "named", "failed_metric"),
    [
        ("model.layers.1.self_attn.o_proj.weight", "model.layers.1.self_attn.o_proj", "max_relative_weight_error"),
        ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight", "max_untouched_abs_diff"),
    ],
)
def test_cli_verify_names_a_tampered_tensor_and_exits_1(
    tiny_base, adapter_dir, merged_llama, tmp_path, capsys, tensor_name, named, failed_metric
):
    tampered = _tamper(merged_llama, tmp_path / "tampered", tensor_name, 1e-3)
    args = ["verify", "--base", str(tiny_base("llama")), "--adapter", str(adapter_dir("llama")), "--merged"]
    assert main([*args, str(tampered)]) == 1
    out = capsys.readouterr().out
    failures = [line for line in out.splitlines() if line.strip().startswith("FAIL:")]
    assert any(failed_metric in line and named in line for line in failures), out
    assert main([*args, str(merged_llama)]) == 0


def test_the_weight_check_a_few_rows_at_a_time_finds_a_tampered_row_in_a_later_block(
    tiny_base, adapter_dir, merged_llama, tmp_path, monkeypatch
):
    """Ŵ is recomputed and compared 5 rows at a time: a faithful merge's errors are the one-block ones, and
    a change in row 100 (block 21 of 26) is found in its module."""
    base, adapter, module = tiny_base("llama"), adapter_dir("llama"), "model.layers.1.self_attn.o_proj"
    whole = verify(base, adapter, merged_dir=merged_llama).weight_errors
    monkeypatch.setattr(formula, "BLOCK_ELEMENTS", 5 * 128)  # 128 input features: 5 rows a block
    blocked = verify(base, adapter, merged_dir=merged_llama).weight_errors
    assert blocked.keys() == whole.keys()
    for name, error in whole.items():
        assert blocked[name].max_abs == pytest.approx(error.max_abs, rel=1e-9, abs=1e-15), name
    tampered = _tamper(merged_llama, tmp_path / "tampered", f"{module}.weight", 1e-3, element=100 * 128 + 3)
    report = verify(base, adapter, merged_dir=tampered)
    assert not report.passed and report.weight_errors[module].max_abs > 5e-4


def test_cli_verify_writes_the_json_report(tiny_base, adapter_dir, merged_llama, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(
        [
            "verify",
            "--base",
            str(tiny_base("llama")),
            "--adapter",
            str(adapter_dir("llama", "D2LORA")),
            "--merged",
            str(merged_llama),
            "--json",
            str(out),
        ]
    )
    written = json.loads(out.read_text())
    assert code == 0 and written["passed"] is True and written["failures"] == []
    assert written["merged_dtype"] == "float32" and written["logits"]["greedy_agreement"] == 1.0
    assert set(written["weight_errors"]) == set(Adapter.load(adapter_dir("llama", "D2LORA")).modules)
    assert "PASSED" in capsys.readouterr().out


def test_cli_verify_dtype_that_contradicts_the_merged_folder_is_a_one_line_error(
    tiny_base, adapter_dir, merged_llama, capsys
):
    code = main(
        [
            "verify",
            "--base",
            str(tiny_base("llama")),
            "--adapter",
            str(adapter_dir("llama", "D2LORA")),
            "--merged",
            str(merged_llama),
            "--dtype",
            "bfloat16",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "float32" in err


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_top1_agreement", 1.5),
        ("max_relative_logit_error", -1.0),
        ("min_greedy_agreement", float("nan")),
    ],
)
def test_bad_thresholds_name_the_field(field, value):
    with pytest.raises(ThresholdError, match=field):
        Thresholds(**{field: value})
