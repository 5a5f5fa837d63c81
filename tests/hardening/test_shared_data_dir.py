"""Replicas sharing one data dir: a starting replica never destroys a live one's merge; each sees the other's writes.

Each Registry below is one server: it holds its own flocks, exactly as a
separate process would (flock conflicts between open file descriptions).
`close()` is that server's crash: its locks go, its files stay.
"""

from __future__ import annotations

from pathlib import Path

from service.registry import INTERRUPTED, Registry


def started(data_dir: Path) -> Registry:
    registry = Registry(data_dir)
    registry.load()
    return registry


def made_ready(registry: Registry, name: str) -> None:
    record = registry.new_version(name, kind="D2LORA", base_model="base")
    path = registry.tensors_path(record)
    path.write_bytes(b"tensors")
    registry.save(record.model_copy(update={"status": "ready", "tensors_file": str(path)}))


def test_a_replica_starting_during_a_merge_leaves_that_merge_alone(tmp_path):
    first = started(tmp_path)
    merging = first.new_version("alpha", kind="D2LORA", base_model="base")
    work = first.work_dir()
    (work / "upload").write_bytes(b"half an upload")
    second = started(tmp_path)
    assert second.latest("alpha").status == "merging"
    assert (work / "upload").read_bytes() == b"half an upload"
    first.save(merging.model_copy(update={"status": "failed", "error": "x"}))
    assert second.latest("alpha").status == "failed"


def test_a_dead_replicas_merge_is_failed_and_its_temp_files_go_while_another_lives(tmp_path):
    live = started(tmp_path)
    dead = started(tmp_path)
    dead.new_version("beta", kind="D2LORA", base_model="base")
    (dead.work_dir() / "upload").write_bytes(b"half")
    dead.close()
    restarted = started(tmp_path)
    record = restarted.latest("beta")
    assert record.status == "failed" and record.error == INTERRUPTED
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == sorted(
        [live.owner, f"{live.owner}.lock", restarted.owner, f"{restarted.owner}.lock"]
    )


def test_replicas_see_each_others_uploads_replacements_and_deletions(tmp_path):
    one, two = started(tmp_path), started(tmp_path)
    made_ready(one, "gamma")
    assert [r.name for r in two.all_serving()] == ["gamma"]
    made_ready(two, "gamma")
    assert one.serving("gamma").version == 2
    two.delete("gamma")
    assert one.latest("gamma") is None and one.all_latest() == []


def test_replicas_never_take_the_same_version(tmp_path):
    one, two = started(tmp_path), started(tmp_path)
    versions = [
        one.new_version("delta", kind="D2LORA", base_model="base").version,
        two.new_version("delta", kind="D2LORA", base_model="base").version,
        one.new_version("delta", kind="D2LORA", base_model="base").version,
    ]
    assert versions == [1, 2, 3]
