"""kill -9 in the middle of everything at once: a merge, an upload still arriving, and swaps between adapters.

After a restart on the same data dir the registry is consistent: the cut
merge is `failed`, the cut upload left no record, no temp file is left,
and every adapter listed serves its reference answers.  A second server
shares the data dir the whole time (a replica): the crash and the restart
leave it serving, and it sees the restarted server's uploads.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from merger.archive import CONFIG_NAME
from tests.hardening.conftest import PROMPTS
from tests.support.live import INFERENCE_HEADERS
from tests.support.uploading import adapter_records, swapping, trickled_upload, upload_files

pytestmark = pytest.mark.slow  # a live server or engine per module (tests/conftest.py: the tiers)


@pytest.fixture(scope="module")
def crashed(start_server, tiny_artifacts):
    server = start_server(D2LORA_TIME_SLICE_S="0.05")
    for name in ("qv", "o"):
        assert upload_files(server, name, tiny_artifacts[name]).status_code == 201
    replica = start_server(data_dir=server.data_dir)
    stop = threading.Event()
    config = (tiny_artifacts["qv"] / CONFIG_NAME).read_bytes()
    workers = [
        threading.Thread(target=trickled_upload, args=(server, "trickle", config, stop)),
        threading.Thread(target=swapping, args=(server, ("qv", "o"), PROMPTS[0], stop)),
    ]
    for worker in workers:
        worker.start()
    time.sleep(1.0)
    assert upload_files(server, "cut", tiny_artifacts["qkvo"], params={"wait": "false"}).status_code == 202
    server.kill()
    stop.set()
    for worker in workers:
        worker.join(30)
    server.start()
    return server, replica


def test_the_cut_merge_is_failed_and_the_cut_upload_left_no_record(crashed):
    server, _ = crashed
    records = adapter_records(server)
    assert records["cut"]["status"] == "failed" and "interrupted" in records["cut"]["error"]
    assert "trickle" not in records
    assert {name: r["status"] for name, r in records.items() if name != "cut"} == {"qv": "ready", "o": "ready"}


def test_no_temp_file_is_left(crashed):
    server, replica = crashed
    entries = server.tmp_entries()
    owners = [e.removesuffix(".lock") for e in entries if e.endswith(".lock")]
    assert len(owners) == 2 and sorted(entries) == sorted(owners + [f"{o}.lock" for o in owners])
    assert all(list((server.data_dir / "tmp" / owner).iterdir()) == [] for owner in owners)
    assert sorted(p.name for p in (server.data_dir / "adapters" / "cut").iterdir()) == ["000001.json"]
    assert not list((server.data_dir / "adapters").glob("*/.*.tmp"))


def test_every_listed_adapter_serves_its_reference_answers_on_both_servers(crashed, tiny_references):
    for server in crashed:
        models = httpx.get(f"{server.url}/v1/models", headers=INFERENCE_HEADERS, timeout=30).json()["data"]
        listed = [m["id"] for m in models]
        assert sorted(listed[1:]) == ["o", "qv"]
        for name in listed:
            assert [server.answer(name, p, 8) for p in PROMPTS] == tiny_references[name], name


def test_the_replica_serves_what_the_restarted_server_uploads(crashed, tiny_artifacts, tiny_references):
    server, replica = crashed
    assert upload_files(server, "after", tiny_artifacts["qkvo"]).status_code == 201
    assert [replica.answer("after", p, 8) for p in PROMPTS] == tiny_references["qkvo"]
    assert httpx.delete(f"{server.url}/adapters/after", headers=server.admin_headers(), timeout=30).status_code == 204
    assert replica.complete("after", PROMPTS[0], 4).status_code == 404
