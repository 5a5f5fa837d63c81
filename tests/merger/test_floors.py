"""The dtype-floor cache (merger.floors): one complete file per base and dtype, safe to share between servers."""

from __future__ import annotations

import os
import shutil
import threading

import torch

from merger.floors import FloorCache, floor_key
from merger.probes import build_probes, load_tokenizer
from merger.report import LogitMetrics


def metrics(top1: float) -> LogitMetrics:
    return LogitMetrics(501, 0.5, 0.05, 1e-3, top1, 0.5, (None, 3, 0, None, 1, 2, None, 4))


def test_a_floor_is_read_back_as_written_and_a_damaged_file_is_a_miss(tiny_base, tmp_path):
    base = tiny_base("llama")
    key = floor_key(base, torch.bfloat16, build_probes(load_tokenizer(base)))
    cache = FloorCache(tmp_path / "floors")
    assert cache.get(key) is None
    cache.put(key, base, torch.bfloat16, metrics(0.96))
    assert cache.get(key) == metrics(0.96)
    cache.path(key).write_text('{"floor": {"positions": 3')
    assert cache.get(key) is None


def test_the_key_changes_with_the_dtype_and_with_the_base_files(tiny_base, tmp_path):
    base = tiny_base("llama")
    probes = build_probes(load_tokenizer(base))
    copy = shutil.copytree(base, tmp_path / "copy")
    os.utime(copy / "model.safetensors", ns=(1, 1))  # same bytes, another file: a new key, never a stale floor
    keys = {floor_key(base, torch.bfloat16, probes), floor_key(base, torch.float16, probes)}
    keys.add(floor_key(copy, torch.bfloat16, probes))
    assert len(keys) == 3 and floor_key(base, torch.bfloat16, probes) in keys


def test_servers_writing_the_same_floor_at_once_leave_one_complete_file(tiny_base, tmp_path):
    base = tiny_base("llama")
    key = floor_key(base, torch.bfloat16, build_probes(load_tokenizer(base)))
    caches = [FloorCache(tmp_path / "floors") for _ in range(8)]  # as replicas sharing a data dir would
    writers = [threading.Thread(target=c.put, args=(key, base, torch.bfloat16, metrics(0.9 + i / 100))) for i, c in
               enumerate(caches)]  # fmt: skip
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert caches[0].get(key) in [metrics(0.9 + i / 100) for i in range(8)]
    assert [p.name for p in (tmp_path / "floors").iterdir()] == [f"{key}.json"]  # no temporary left
