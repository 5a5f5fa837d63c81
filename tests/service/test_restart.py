"""A restart keeps what was uploaded; a crash mid-merge leaves a failed record, never a half adapter."""

from __future__ import annotations

import openai
import pytest

from tests.service.conftest import ADAPTERS, MAX_TOKENS, PROMPTS
from tests.support.live import API_KEY
from tests.support.uploading import adapter_records, upload_files


@pytest.fixture(scope="module")
def crashed_and_restarted(live_server, uploaded, artifacts):
    """Start a merge, kill the server (SIGKILL) while it runs, start it again on the same data dir."""
    before = {"records": adapter_records(live_server), "token": live_server.admin_token}
    response = upload_files(live_server, "crash", artifacts["qkvo"], params={"wait": "false"})
    assert response.status_code == 202
    live_server.kill()
    live_server.start()
    return before


def test_adapters_uploaded_before_a_restart_serve_the_same_answers(live_server, crashed_and_restarted, references):
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY, timeout=300, max_retries=0)
    for name in [live_server.base_name, *ADAPTERS]:
        answers = [
            client.completions.create(model=name, prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
            for p in PROMPTS
        ]
        assert answers == references[name], name


def test_records_and_admin_token_survive(live_server, crashed_and_restarted):
    records = adapter_records(live_server)
    assert {name: records[name] for name in crashed_and_restarted["records"]} == crashed_and_restarted["records"]
    assert live_server.admin_token == crashed_and_restarted["token"]


def test_a_merge_cut_by_a_crash_is_failed_not_listed_and_leaves_no_temp_files(live_server, crashed_and_restarted):
    record = adapter_records(live_server)["crash"]
    assert record["status"] == "failed" and "interrupted" in record["error"] and record["tensors_file"] is None
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY, max_retries=0)
    assert "crash" not in [m.id for m in client.models.list()]
    (lock,) = (live_server.data_dir / "tmp").glob("*.lock")  # the running server's own, and its empty folder
    assert sorted(p.name for p in (live_server.data_dir / "tmp").iterdir()) == [lock.stem, lock.name]
    assert list((live_server.data_dir / "tmp" / lock.stem).iterdir()) == []
    assert [p.name for p in (live_server.data_dir / "adapters" / "crash").iterdir()] == ["000001.json"]
