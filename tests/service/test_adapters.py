"""POST/GET/DELETE /adapters on a live server: records, refusals, ?wait=false, 409/replace, DELETE."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save

from merger.archive import CONFIG_NAME, WEIGHTS_NAME
from merger.checkpoint import read_header
from tests.service.conftest import MAX_TOKENS, PROMPTS, UPLOAD_CAP_BYTES
from tests.support.live import API_KEY
from tests.support.uploading import adapter_records, post_adapter, upload_files, wait_for_status


def test_upload_answers_the_ready_record(uploaded, live_server):
    for name, record in uploaded.items():
        assert record["name"] == name and record["status"] == "ready" and record["version"] == 1
        assert record["kind"] == "D2LORA" and record["base_model"] == live_server.base_name
        assert record["equivalence"]["passed"] is True and record["merge_seconds"] > 0
    assert adapter_records(live_server) == uploaded


def test_the_kept_tensors_are_only_the_targeted_ones(uploaded):
    header, _ = read_header(Path(uploaded["qv"]["tensors_file"]))
    names = set(header) - {"__metadata__"}
    assert names and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in names)


def test_get_one_adapter_and_a_missing_one(live_server, uploaded):
    one = httpx.get(f"{live_server.url}/adapters/o-mlp", headers=live_server.admin_headers())
    assert one.status_code == 200 and one.json() == uploaded["o-mlp"]
    missing = httpx.get(f"{live_server.url}/adapters/nope", headers=live_server.admin_headers())
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found"


# refusals: each leaves the registry (and the data dir) as it was


def rewritten_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / CONFIG_NAME).read_text())
    (dst / CONFIG_NAME).write_text(json.dumps({**config, **changes}))
    return dst


def pickle_archive(src, tmp_path):
    path = tmp_path / "pickled.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src / CONFIG_NAME, arcname=CONFIG_NAME)
        tar.add(src / WEIGHTS_NAME, arcname="adapter_model.bin")
    return path


def one_factor_too_wide(weights_file: Path) -> bytes:
    """The artifact's weights with one lora_A one column wider than its base layer."""
    tensors = load_file(weights_file)
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    tensors[key] = torch.cat([tensors[key], tensors[key][:, :1]], dim=1)  # (r, in + 1)
    return save(tensors)


def bad_upload(kind: str, artifacts, tmp_path):
    """(form fields, files) of one kind of bad upload."""
    qv = artifacts["qv"]
    config, weights = (qv / CONFIG_NAME).read_bytes(), (qv / WEIGHTS_NAME).read_bytes()
    if kind == "bad-name":
        return {"name": "Not Valid!"}, {"config": config, "weights": weights}
    if kind == "no-name":
        return {}, {"config": config, "weights": weights}
    if kind == "config-only":
        return {"name": "x1"}, {"config": config}
    if kind == "config-not-json":
        return {"name": "x1"}, {"config": b"{not json", "weights": weights}
    if kind == "other-base":
        other = rewritten_config(qv, tmp_path / "other", base_model_name_or_path="meta-llama/Llama-3.1-8B")
        return {"name": "x1"}, {"config": (other / CONFIG_NAME).read_bytes(), "weights": weights}
    if kind == "wrong-shapes":
        return {"name": "x1"}, {"config": config, "weights": one_factor_too_wide(qv / WEIGHTS_NAME)}
    if kind == "pickle":
        return {"name": "x1"}, {"archive": pickle_archive(qv, tmp_path).read_bytes()}
    if kind == "too-large":
        return {"name": "x1"}, {"archive": b"\0" * (UPLOAD_CAP_BYTES + 1)}
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind, status, words",
    [
        ("bad-name", 400, "must match"),
        ("no-name", 400, "'name' is required"),
        ("config-only", 400, "either files"),
        ("config-not-json", 422, "not valid JSON"),
        ("other-base", 422, "base_model_name_or_path"),
        ("wrong-shapes", 422, "shape"),
        ("pickle", 422, "pickle"),
        ("too-large", 413, "limit"),
    ],
)
def test_bad_uploads_are_refused_and_change_nothing(live_server, artifacts, tmp_path, kind, status, words):
    before = adapter_records(live_server)
    response = post_adapter(live_server, *bad_upload(kind, artifacts, tmp_path))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert adapter_records(live_server) == before
    assert no_upload_files_left(live_server.data_dir)


def no_upload_files_left(data_dir: Path) -> bool:
    """Every server's tmp/<owner> folder is empty (their .lock files stay while they live)."""
    return all(not any(folder.iterdir()) for folder in (data_dir / "tmp").iterdir() if folder.is_dir())


def test_a_body_that_is_not_multipart_is_415(live_server):
    response = httpx.post(f"{live_server.url}/adapters", json={"name": "x"}, headers=live_server.admin_headers())
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"


def test_a_taken_name_is_409(live_server, uploaded, artifacts):
    response = upload_files(live_server, "qv", artifacts["o-mlp"])
    assert response.status_code == 409 and response.json()["error"]["code"] == "adapter_exists"
    assert adapter_records(live_server) == uploaded


def test_the_base_models_name_is_409(live_server, uploaded, artifacts):
    response = upload_files(live_server, live_server.base_name.lower(), artifacts["o-mlp"])
    assert response.status_code == 409 and response.json()["error"]["code"] == "name_taken"


# the asynchronous flow, replacement and deletion, on a name of their own


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY, timeout=300, max_retries=0)


def greedy_answers(client, model: str) -> list[str]:
    return [
        client.completions.create(model=model, prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
        for p in PROMPTS
    ]


def test_wait_false_answers_202_then_the_record_becomes_ready(live_server, uploaded, artifacts, client, references):
    response = upload_files(live_server, "scratch", artifacts["o-mlp"], params={"wait": "false"})
    assert response.status_code == 202 and response.json()["status"] == "merging"
    assert response.headers["location"] == "/adapters/scratch"
    record = wait_for_status(live_server, "scratch", {"ready", "failed"})
    assert record["status"] == "ready" and record["version"] == 1
    assert greedy_answers(client, "scratch") == references["o-mlp"]  # the same artifact as "o-mlp"


def test_replace_swaps_in_the_new_version_and_the_old_serves_meanwhile(live_server, artifacts, client, references):
    response = upload_files(live_server, "scratch", artifacts["qv"], params={"wait": "false", "replace": "true"})
    assert response.status_code == 202 and response.json()["version"] == 2
    assert "scratch" in [m.id for m in client.models.list()]  # version 1 still serves while 2 merges
    again = upload_files(live_server, "scratch", artifacts["qv"], params={"replace": "true"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "merge_in_progress"
    record = wait_for_status(live_server, "scratch", {"ready", "failed"})
    assert record["status"] == "ready" and record["version"] == 2
    assert greedy_answers(client, "scratch") == references["qv"]
    assert sorted(p.name for p in (live_server.data_dir / "adapters" / "scratch").iterdir()) == [
        "000002.artifact",
        "000002.form",
        "000002.json",
        "000002.safetensors",
    ]


def test_delete_removes_the_adapter_everywhere(live_server, client):
    response = httpx.delete(f"{live_server.url}/adapters/scratch", headers=live_server.admin_headers())
    assert response.status_code == 204
    assert "scratch" not in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="scratch", prompt="hi", max_tokens=2)
    assert not (live_server.data_dir / "adapters" / "scratch").exists()
    again = httpx.delete(f"{live_server.url}/adapters/scratch", headers=live_server.admin_headers())
    assert again.status_code == 404
