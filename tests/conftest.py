"""Cross-cutting fixtures: tiny checkpoints built once per session."""

from __future__ import annotations

import os

import pytest
import torch

from tests.tiny import make_tiny_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Factory: tiny_base(arch, dtype, max_shard_size) -> a checkpoint folder, built once per session."""
    built = {}

    def build(arch: str = "llama", dtype: torch.dtype = torch.float32, max_shard_size: str = "5GB"):
        key = (arch, dtype, max_shard_size)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"{arch}-{str(dtype).removeprefix('torch.')}")
            built[key] = make_tiny_checkpoint(folder, arch, dtype, max_shard_size)
        return built[key]

    return build
