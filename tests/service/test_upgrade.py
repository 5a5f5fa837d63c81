"""A version without a per-request form gets one on start from its kept artifact (service.upgrade); one
without an artifact either (an older release's) is still served, with merged weights, and the log says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.support.adapters import write_random_adapter
from tests.support.live import serve_process
from tests.support.uploading import adapter_records, upload_files

pytestmark = pytest.mark.slow  # a live server, started three times

TINY_SERVER = {"max_model_len": "256", "kv_cache_gib": "1", "max_num_seqs": "4"}  # tests/support/tiny.py
PROMPT = "The capital of France is"


def forget(record: dict, data_dir: Path, *fields: str) -> None:
    """Remove what `fields` name from disk and from the record, as an older release wrote it."""
    for field in fields:
        shutil.rmtree(record[field])
    path = data_dir / "adapters" / record["name"] / f"{record['version']:06d}.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | dict.fromkeys(fields)))


def tensors(folder: Path) -> dict:
    return {name: load_file(file) for file in folder.glob("*.safetensors") for name in [file.name]}


def test_a_version_gets_its_form_back_from_its_artifact_and_without_one_is_still_served(tiny_base, tmp_path):
    base = tiny_base("llama")
    adapter = write_random_adapter(tmp_path / "adapter", base, seed=5)
    data_dir = tmp_path / "data"
    with serve_process(base, data_dir, tmp_path / "logs", "transformers", **TINY_SERVER) as server:
        response = upload_files(server, "old", adapter)
        assert response.status_code == 201, response.text
        uploaded, answer = response.json(), server.answer("old", PROMPT, 8)
        form = Path(uploaded["form_dir"])
        written = tensors(form)
        server.stop()
        forget(uploaded, data_dir, "form_dir")
        server.start()
        rebuilt = adapter_records(server)["old"]
        assert rebuilt["form_dir"] == uploaded["form_dir"] and written.keys() == tensors(form).keys()
        for name, file in tensors(form).items():
            assert all(file[key].equal(written[name][key]) for key in file), name
        assert server.answer("old", PROMPT, 8) == answer
        server.stop()
        forget(rebuilt, data_dir, "form_dir", "artifact_dir")
        server.start()
        record = adapter_records(server)["old"]
        assert record["status"] == "ready" and record["form_dir"] is None and record["artifact_dir"] is None
        assert server.answer("old", PROMPT, 8) == answer
        assert "no kept artifact (uploaded by an older release)" in server.log_tail(200)
