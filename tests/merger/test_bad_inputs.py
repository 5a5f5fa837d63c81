"""Every bad input through the real CLI: one line on stderr naming the problem, exit 2,
no traceback, no output folder and no leftover temporary folder."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merger.fs import TMP_MARKER
from service.cli import main
from tests.merger.refusals import PickleTrap, assert_refused, run_merge

Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"


def edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensors(adapter: Path, edit) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _set(name: str, tensor: torch.Tensor):
    return lambda tensors: tensors.__setitem__(name, tensor)


def _poison(name: str, value: float):
    def edit(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name][0, 0] = value

    return edit


CONFIG_CASES = {
    "r zero": ({"r": 0}, r"\br: must be an integer"),
    "r string": ({"r": "8"}, r"\br: must be an integer.*'8'"),
    "r bool": ({"r": True}, r"\br: must be an integer"),
    "alpha zero": ({"lora_alpha": 0}, r"lora_alpha: must be"),
    "tau negative": ({"tau": -1}, r"tau: must be a finite number >= 0"),
    "unknown peft_type": ({"peft_type": "IA3"}, r"peft_type: 'IA3' is not supported"),
    "empty target_modules": ({"target_modules": []}, r"target_modules: must be a non-empty"),
    "blank target_modules": ({"target_modules": ""}, r"target_modules: must be a non-empty"),
    "number target_modules": ({"target_modules": 5}, r"target_modules: must be"),
    "object target_modules": ({"target_modules": {"q_proj": 1}}, r"target_modules: must be"),
    "flag not bool": ({"use_rslora": "yes"}, r"use_rslora: must be true or false"),
    "rank_pattern value": ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]: must be an integer"),
    "rank_pattern bad regex": ({"rank_pattern": {"q_proj(": 2}}, r"rank_pattern\['q_proj\('\]: bad regular expression"),
    "alpha_pattern not object": ({"alpha_pattern": [1]}, r"alpha_pattern: must be an object"),
    "exclude_modules type": ({"exclude_modules": 5}, r"exclude_modules: must be"),
    "exclude_modules bad regex": ({"exclude_modules": "q_proj("}, r"exclude_modules: bad regular expression"),
    "layers_to_transform negative": ({"layers_to_transform": [0, -1]}, r"layers_to_transform: must be a layer index"),
    "layers_to_transform string": ({"layers_to_transform": "0"}, r"layers_to_transform: must be a layer index"),
    "layers_pattern type": ({"layers_pattern": 3}, r"layers_pattern: must be a string"),
    "r missing": ({"r": None}, r"\br: missing"),
    "config not object": (None, r"must hold a JSON object"),
}


@pytest.mark.parametrize("case", CONFIG_CASES, ids=list(CONFIG_CASES))
def test_bad_config_fields(capsys, llama, adapter, tmp_path, case):
    changes, message = CONFIG_CASES[case]
    if changes is None:
        (adapter / "adapter_config.json").write_text("[1, 2]")
    else:
        edit_config(adapter, **changes)
    assert_refused(capsys, llama, adapter, tmp_path / "out", message)


def test_alpha_nan(capsys, llama, adapter, tmp_path):
    text = (adapter / "adapter_config.json").read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN')
    (adapter / "adapter_config.json").write_text(text)
    assert_refused(capsys, llama, adapter, tmp_path / "out", r"lora_alpha: must be a finite non-zero number, got nan")


def test_bad_json(capsys, llama, adapter, tmp_path):
    (adapter / "adapter_config.json").write_text('{"r": 8,')
    assert_refused(capsys, llama, adapter, tmp_path / "out", r"adapter_config.json: not valid JSON")


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_file(capsys, llama, adapter, tmp_path, missing):
    (adapter / missing).unlink()
    assert_refused(capsys, llama, adapter, tmp_path / "out", rf"{missing} is missing")


TENSOR_CASES = {
    "missing factor": (
        lambda t: t.pop(f"{Q_PROJ}.lora_B_neg.weight"),
        r"q_proj: missing factor tensors lora_B_neg.weight",
    ),
    "shape vs base": (
        _set(f"{Q_PROJ}.lora_A.weight", torch.ones(4, 129)),
        r"q_proj.lora_A.weight: shape \[4, 129\] does not match \[4, 128\]",
    ),
    "shape vs r": (_set(f"{Q_PROJ}.lora_B.weight", torch.ones(128, 3)), r"q_proj.lora_B.weight: shape \[128, 3\].*r=4"),
    "nan factor": (_poison(f"{Q_PROJ}.lora_A.weight", float("nan")), r"q_proj.lora_A.weight.*NaN or infinite"),
    "inf factor": (_poison(f"{Q_PROJ}.lora_B_neg.weight", float("inf")), r"q_proj.lora_B_neg.weight.*NaN or infinite"),
    "module not in base": (
        lambda t: t.update(
            {k.replace("layers.0.", "layers.9."): v.clone() for k, v in list(t.items()) if k.startswith(Q_PROJ)}
        ),
        r"model.layers.9.self_attn.q_proj: no such module in the base model",
    ),
    "factor of another kind": (
        _set(f"{Q_PROJ}.lora_magnitude_vector", torch.ones(128)),
        r"lora_magnitude_vector.*not a D2LORA factor",
    ),
    "magnitude in a plain LoRA": (
        _set(f"{Q_PROJ}.lora_magnitude_vector.weight", torch.ones(128)),
        r"lora_magnitude_vector.weight.*not a D2LORA factor",
    ),
    "integer factor": (
        _set(f"{Q_PROJ}.lora_A.weight", torch.ones(4, 128, dtype=torch.int32)),
        r"lora_A.weight.*not floating point",
    ),
    "unprefixed name": (
        _set("model.layers.0.self_attn.q_proj.lora_A.weight", torch.ones(4, 128)),
        r"must start with 'base_model.model.'",
    ),
    "untargeted module": (
        lambda t: t.update(
            {
                k.replace("self_attn.q_proj", "mlp.up_proj"): v.clone()
                for k, v in list(t.items())
                if k.startswith(Q_PROJ)
            }
        ),
        r"mlp.up_proj: has factors but does not match target_modules",
    ),
    "targeted module without factors": (
        lambda t: [t.pop(k) for k in list(t) if k.startswith(Q_PROJ)],
        r"layers.0.self_attn.q_proj: matches target_modules but the artifact has no factors",
    ),
}


@pytest.mark.parametrize("case", TENSOR_CASES, ids=list(TENSOR_CASES))
def test_bad_tensors(capsys, llama, adapter, tmp_path, case):
    edit, message = TENSOR_CASES[case]
    edit_tensors(adapter, edit)
    assert_refused(capsys, llama, adapter, tmp_path / "out", message)


def test_wrong_r_in_config(capsys, llama, adapter, tmp_path):
    edit_config(adapter, r=8)
    assert_refused(
        capsys, llama, adapter, tmp_path / "out", r"lora_A.weight: shape \[4, 128\] does not match \[8, 128\] \(r=8"
    )


@pytest.mark.parametrize(
    "content", [b"not safetensors at all", b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}'], ids=["garbage", "bad header"]
)
def test_corrupt_safetensors(capsys, llama, adapter, tmp_path, content):
    (adapter / "adapter_model.safetensors").write_bytes(content)
    assert_refused(capsys, llama, adapter, tmp_path / "out", r"adapter_model.safetensors: unreadable")


def test_truncated_safetensors(capsys, llama, adapter, tmp_path):
    path = adapter / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert_refused(capsys, llama, adapter, tmp_path / "out", r"adapter_model.safetensors: unreadable")


def test_out_dir_already_exists_is_left_alone(capsys, llama, good_adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_merge(capsys, llama, good_adapter, out)
    assert code == 2 and err.count("\n") == 1 and "already exists" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_base_with_only_pickle_weights(capsys, llama, good_adapter, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(llama / "config.json", base)
    marker = tmp_path / "unpickled"
    (base / "pytorch_model.bin").write_bytes(pickle.dumps(PickleTrap(marker)))
    assert_refused(capsys, base, good_adapter, tmp_path / "out", r"only pickle weights found; safetensors are required")
    assert not marker.exists()


def test_missing_base(capsys, good_adapter, tmp_path):
    assert_refused(capsys, tmp_path / "nowhere", good_adapter, tmp_path / "out", r"nowhere: no such folder")


def copy_base(llama: Path, dest: Path) -> Path:
    return Path(shutil.copytree(llama, dest))


@pytest.mark.parametrize(
    "content",
    [b"garbage", b"\xff" * 8 + b"{}", b"\x08\x00\x00\x00\x00\x00\x00\x00[1, 2] "],
    ids=["short", "huge header", "header not object"],
)
def test_corrupt_base_shard(capsys, llama, good_adapter, tmp_path, content):
    base = copy_base(llama, tmp_path / "base")
    (base / "model.safetensors").write_bytes(content)
    assert_refused(capsys, base, good_adapter, tmp_path / "out", r"model.safetensors: not a safetensors file")


def test_truncated_base_shard_is_found_before_writing(capsys, llama, good_adapter, tmp_path):
    base = copy_base(llama, tmp_path / "base")
    shard = base / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert_refused(capsys, base, good_adapter, tmp_path / "out", r"model.safetensors: .*(truncated|beyond the end)")


def test_bad_base_index(capsys, llama, good_adapter, tmp_path):
    base = copy_base(llama, tmp_path / "base")
    (base / "model.safetensors.index.json").write_text("{not json")
    assert_refused(capsys, base, good_adapter, tmp_path / "out", r"model.safetensors.index.json: ")


def base_with_rows(llama: Path, dest: Path, key: str, value: float) -> Path:
    base = copy_base(llama, dest)
    state = load_file(base / "model.safetensors")
    state[key] = state[key].clone()
    state[key][5] = value
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    return base


def test_fusion_making_a_zero_norm_row(capsys, llama, adapter, tmp_path):
    """Row 5 of layer 1's q_proj is zero in the base and in both B's: n′ = 0 half-way through the merge."""
    module = "model.layers.1.self_attn.q_proj"
    base = base_with_rows(llama, tmp_path / "base", f"{module}.weight", 0.0)

    def zero_rows(tensors):
        for name in ("lora_B.weight", "lora_B_neg.weight"):
            tensors[f"base_model.model.{module}.{name}"][5] = 0

    edit_tensors(adapter, zero_rows)
    assert_refused(capsys, base, adapter, tmp_path / "out", rf"{module}: adapted weight has zero norm in rows \[5\]")


def test_non_finite_base_weight(capsys, llama, good_adapter, tmp_path):
    base = base_with_rows(llama, tmp_path / "base", "model.layers.1.self_attn.v_proj.weight", float("inf"))
    assert_refused(
        capsys, base, good_adapter, tmp_path / "out", r"model.layers.1.self_attn.v_proj: fused weight has non-finite"
    )


def test_integer_base_weight_is_refused(capsys, llama, good_adapter, tmp_path):
    base = copy_base(llama, tmp_path / "base")
    state = load_file(base / "model.safetensors")
    state["model.layers.0.self_attn.k_proj.weight"] = torch.ones(64, 128, dtype=torch.int8)
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    assert_refused(
        capsys,
        base,
        good_adapter,
        tmp_path / "out",
        r"layers.0.self_attn.k_proj: base weight is I8, not floating point",
    )


def test_fp16_overflow_is_refused(capsys, llama, adapter, tmp_path):
    """Ŵ is finite in fp32 but not once cast to float16: still an error, nothing written."""
    edit_tensors(adapter, lambda t: t[f"{Q_PROJ}.lora_B.weight"].mul_(1e6))
    code, err = run_merge(capsys, llama, adapter, tmp_path / "out", "--dtype", "float16")
    assert code == 2 and "q_proj" in err and "float16" in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if TMP_MARKER in p.name]


def test_real_cli_process_prints_one_line(llama, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "merge",
            "--base",
            str(llama),
            "--adapter",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "out"),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"d2lora merge: error: {tmp_path / 'nope'}: no such file or directory"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["0", "-5MB", "infGB", "lots"])
def test_bad_max_shard_size(capsys, llama, good_adapter, tmp_path, size):
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "merge",
                "--base",
                str(llama),
                "--adapter",
                str(good_adapter),
                "--out",
                str(tmp_path / "out"),
                f"--max-shard-size={size}",
            ]
        )
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert f"argument --max-shard-size: '{size}' is not a" in err
    assert not (tmp_path / "out").exists()
