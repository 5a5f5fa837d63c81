"""Cross-cutting fixtures (tiny checkpoints built once per session) and the test tiers.

Tiers: `python -m pytest -m "not vllm and not slow"` is the inner loop (`make check` runs it);
`make test` runs everything.  A test that starts a vLLM engine is marked `vllm` here, from the
fixtures it uses, so the mark cannot drift from what the test really starts.
"""

from __future__ import annotations

import os

import pytest
import torch

from merger.dtypes import dtype_name
from tests.support.tiny import make_tiny_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Fixtures that start a vLLM engine (directly or through a live `d2lora serve --engine vllm`).
VLLM_FIXTURES = frozenset({"vllm_scheduler", "live_server", "vllm_server", "lora_engine"})


def uses_vllm(item: pytest.Item) -> bool:
    if VLLM_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("scheduler") == "vllm"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if uses_vllm(item):
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Factory: tiny_base(arch, dtype, max_shard_size) -> a checkpoint folder, built once per session."""
    built = {}

    def build(arch: str = "llama", dtype: torch.dtype = torch.float32, max_shard_size: str = "5GB"):
        key = (arch, dtype, max_shard_size)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"{arch}-{dtype_name(dtype)}")
            built[key] = make_tiny_checkpoint(folder, arch, dtype, max_shard_size)
        return built[key]

    return build
