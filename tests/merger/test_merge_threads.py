"""merge(threads=...): the fusing maths runs on its own thread count, the caller's is restored."""

from __future__ import annotations

import pytest
import torch

from merger.checkpoint import CheckpointReader
from merger.merge import MergeError, merge


def _tensors(folder) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    try:
        return {name: reader.read(name) for name in reader.tensors}
    finally:
        reader.close()


def test_caller_thread_count_is_restored(llama, good_adapter, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        merge(llama, good_adapter, tmp_path / "out", progress=False, threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_thread_count_does_not_change_the_weights(llama, good_adapter, tmp_path):
    merge(llama, good_adapter, tmp_path / "one", progress=False, threads=1)
    merge(llama, good_adapter, tmp_path / "unchanged", progress=False, threads=None)
    one, unchanged = _tensors(tmp_path / "one"), _tensors(tmp_path / "unchanged")
    assert one.keys() == unchanged.keys()
    assert all(torch.equal(one[name], unchanged[name]) for name in one)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_thread_count_is_refused_before_writing(llama, good_adapter, tmp_path, threads):
    with pytest.raises(MergeError, match=r"^threads: must be a positive integer or None"):
        merge(llama, good_adapter, tmp_path / "out", progress=False, threads=threads)
    assert not (tmp_path / "out").exists()
