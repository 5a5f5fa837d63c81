"""The worker stages of an upload (service.merging): fuse (with the per-request form) → verify, one log line each,
the dtype floor kept once."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from merger.archive import DEFAULT_LIMITS
from merger.checkpoint import checkpoint_shapes, file_tensors
from merger.floors import FloorCache
from merger.per_request import read_row_scales, write_per_request_form
from service.merging import WORKER_STAGES, EquivalenceError, Stage, UploadWork, check_adapter, run_stages
from tests.support.adapters import write_random_adapter


@pytest.fixture(scope="module")
def llama(tiny_base):
    return tiny_base("llama")


@pytest.fixture(scope="module")
def artifact(llama, tmp_path_factory):
    return write_random_adapter(
        tmp_path_factory.mktemp("upload") / "adapter", llama, seed=3, targets=["q_proj", "o_proj"]
    )


def upload_work(llama, artifact, work_dir, dtype="auto", floors=None) -> UploadWork:
    work_dir.mkdir()
    checked = check_adapter(artifact, checkpoint_shapes(llama), llama.name, False, DEFAULT_LIMITS)
    return UploadWork(llama, artifact, work_dir, checked, dtype, DEFAULT_LIMITS, floors, "adapter t v1")


def test_the_stages_leave_only_the_fused_targets_and_log_each_with_its_seconds(llama, artifact, tmp_path, caplog):
    work = upload_work(llama, artifact, tmp_path / "work")
    with caplog.at_level(logging.INFO, logger="service.merging"):
        outcome = run_stages(work)
    assert outcome.equivalence["passed"] is True and outcome.seconds > 0
    assert sorted(p.name for p in work.work_dir.iterdir()) == ["form", "fused.safetensors"]
    assert set(load_file(work.fused_file)) == set(work.checked.weight_keys)
    adapted = {key.removesuffix(".weight") for key in work.checked.weight_keys}
    assert set(read_row_scales(work.form_dir)) == adapted  # D²-LoRA: every adapted module has d ≠ 1
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[3] for line in lines] == [s.name for s in WORKER_STAGES]
    assert all(line.startswith("adapter t v1: ") and line.endswith(" s") for line in lines), lines


def test_the_form_written_with_the_fuse_is_the_one_written_on_its_own(llama, artifact, tmp_path):
    """The fuse computes each row scale once for the fused tensor and the form: the same folder, bit for bit."""
    work = upload_work(llama, artifact, tmp_path / "work")
    WORKER_STAGES[0].run(work)
    alone = write_per_request_form(llama, artifact, tmp_path / "alone").out_dir
    assert sorted(p.name for p in work.form_dir.iterdir()) == sorted(p.name for p in alone.iterdir())
    for path in alone.iterdir():
        if path.suffix == ".safetensors":
            ours, theirs = load_file(work.form_dir / path.name), load_file(path)
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), path.name
        else:
            assert (work.form_dir / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_stage_added_after_the_fuse_runs_in_order_and_a_failing_verify_names_the_module(
    llama, artifact, tmp_path, caplog
):
    """A stage is one more entry; here it corrupts the fused file, so verify must refuse it."""

    def corrupt(work: UploadWork) -> None:
        stored = file_tensors(work.fused_file)["model.layers.1.self_attn.o_proj.weight"]
        with open(work.fused_file, "r+b") as f:
            f.seek(stored.offset)  # its first element
            f.write(torch.tensor([1e3], dtype=torch.float32).numpy().tobytes())

    fuse, verify = WORKER_STAGES
    work = upload_work(llama, artifact, tmp_path / "work")
    with caplog.at_level(logging.INFO, logger="service.merging"), pytest.raises(EquivalenceError) as refused:
        run_stages(work, (fuse, Stage("corrupt", corrupt), verify))
    assert "max_relative_weight_error = " in str(refused.value) and " in model.layers.1.self_attn.o_proj" in str(
        refused.value
    )
    assert refused.value.report["passed"] is False
    assert [r.getMessage().split()[3] for r in caplog.records] == ["fuse", "corrupt", "verify"]
    assert "verify failed after" in caplog.records[-1].getMessage()


@pytest.mark.slow
def test_the_dtype_floor_is_computed_once_per_base_and_dtype_and_then_read(llama, artifact, tmp_path):
    floors = FloorCache(tmp_path / "floors")
    first = run_stages(upload_work(llama, artifact, tmp_path / "first", "bfloat16", floors))
    (cached,) = (tmp_path / "floors").iterdir()
    assert json.loads(json.dumps(first.equivalence["dtype_floor"])) == json.loads(cached.read_text())["floor"]
    record = json.loads(cached.read_text())
    record["floor"]["mean_kl"] = 123.0  # a value no computation gives: seen only if the file is read
    cached.write_text(json.dumps(record))
    second = run_stages(upload_work(llama, artifact, tmp_path / "second", "bfloat16", floors))
    assert second.equivalence["dtype_floor"]["mean_kl"] == 123.0
    assert [p.name for p in (tmp_path / "floors").iterdir()] == [cached.name]
