"""The adapter registry on disk, without a server: persistence, crash recovery, versions."""

from __future__ import annotations

from service.registry import INTERRUPTED, Registry


def ready(registry: Registry, name: str, payload: bytes = b"tensors"):
    record = registry.new_version(name, kind="D2LORA", base_model="base")
    path = registry.tensors_path(record)
    path.write_bytes(payload)
    done = record.model_copy(update={"status": "ready", "tensors_file": str(path), "merge_seconds": 1.5})
    registry.save(done)
    return done


def reloaded(data_dir) -> Registry:
    registry = Registry(data_dir)
    registry.load()
    return registry


def test_records_survive_a_reload(tmp_path):
    registry = reloaded(tmp_path)
    record = ready(registry, "alpha")
    assert reloaded(tmp_path).latest("alpha") == record


def test_a_merge_interrupted_by_a_crash_becomes_failed_and_temp_files_go(tmp_path):
    registry = reloaded(tmp_path)
    registry.new_version("beta", kind="D2LORA", base_model="base")
    leftover = registry.work_dir() / "merged"
    leftover.mkdir()
    (tmp_path / "adapters" / "beta" / ".000001.json.abc.tmp").write_text("{half")
    registry.close()  # the crash: its locks go, its files stay
    after = reloaded(tmp_path)
    record = after.latest("beta")
    assert record.status == "failed" and record.error == INTERRUPTED
    assert after.serving("beta") is None and after.all_serving() == []
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == [after.owner, f"{after.owner}.lock"]
    assert list((tmp_path / "tmp" / after.owner).iterdir()) == []
    assert [p.name for p in (tmp_path / "adapters" / "beta").iterdir()] == ["000001.json"]


def test_a_ready_record_whose_tensors_vanished_is_failed(tmp_path):
    registry = reloaded(tmp_path)
    record = ready(registry, "gamma")
    registry.tensors_path(record).unlink()
    registry.close()
    assert reloaded(tmp_path).latest("gamma").status == "failed"


def test_a_replacement_in_progress_leaves_the_previous_version_serving(tmp_path):
    registry = reloaded(tmp_path)
    first = ready(registry, "delta")
    second = registry.new_version("delta", kind="D2LORA", base_model="base")
    assert registry.latest("delta") == second and registry.serving("delta") == first
    registry.close()
    after = reloaded(tmp_path)
    assert after.latest("delta").status == "failed" and after.serving("delta") == first


def test_prune_keeps_only_the_serving_version(tmp_path):
    registry = reloaded(tmp_path)
    ready(registry, "eps", b"v1")
    second = ready(registry, "eps", b"v2")
    registry.prune("eps")
    assert sorted(p.name for p in (tmp_path / "adapters" / "eps").iterdir()) == ["000002.json", "000002.safetensors"]
    assert reloaded(tmp_path).latest("eps") == second


def test_discarding_the_only_version_forgets_the_name(tmp_path):
    registry = reloaded(tmp_path)
    record = registry.new_version("zeta", kind="D2LORA", base_model="base")
    registry.discard(record)
    assert registry.latest("zeta") is None and not (tmp_path / "adapters" / "zeta").exists()


def test_delete_removes_every_version(tmp_path):
    registry = reloaded(tmp_path)
    ready(registry, "eta")
    ready(registry, "eta")
    registry.delete("eta")
    assert reloaded(tmp_path).latest("eta") is None and not (tmp_path / "adapters" / "eta").exists()
