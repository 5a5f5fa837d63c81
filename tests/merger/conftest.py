"""Fixtures of the merger tests: the tiny models, random adapters for them, and their merges."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from merger.dtypes import dtype_name
from merger.merge import merge
from tests.support.adapters import write_random_adapter


@pytest.fixture(scope="session")
def llama(tiny_base):
    return tiny_base("llama")


@pytest.fixture(scope="session")
def good_adapter(llama, tmp_path_factory):
    return write_random_adapter(tmp_path_factory.mktemp("good") / "adapter", llama, r=4, seed=1)


@pytest.fixture
def adapter(good_adapter, tmp_path):
    """A fresh, editable copy of a valid D²-LoRA adapter folder."""
    return Path(shutil.copytree(good_adapter, tmp_path / "adapter"))


@pytest.fixture(scope="session")
def adapter_dir(tiny_base, tmp_path_factory):
    """Factory: adapter_dir(arch, kind, seed) -> a random adapter folder for the tiny base, built once."""
    built = {}

    def build(arch: str = "llama", kind: str = "D2LORA", seed: int = 0):
        if (arch, kind, seed) not in built:
            folder = tmp_path_factory.mktemp(f"adapter-{arch}-{kind}-{seed}")
            built[arch, kind, seed] = write_random_adapter(folder, tiny_base(arch), kind, seed=seed)
        return built[arch, kind, seed]

    return build


@pytest.fixture(scope="session")
def merged_dir(tiny_base, adapter_dir, tmp_path_factory):
    """Factory: merged_dir(arch, dtype) -> the tiny base merged with its seed-0 D²-LoRA adapter, built once."""
    built = {}

    def build(arch: str = "llama", dtype: torch.dtype = torch.float32):
        if (arch, dtype) not in built:
            out = tmp_path_factory.mktemp("merged") / f"{arch}-d2lora-{dtype_name(dtype)}"
            built[arch, dtype] = merge(
                tiny_base(arch), adapter_dir(arch, "D2LORA"), out, dtype=dtype_name(dtype), progress=False
            ).out_dir
        return built[arch, dtype]

    return build


@pytest.fixture(scope="session")
def merged_llama(merged_dir):
    """The tiny llama base merged with the seed-0 D²-LoRA adapter, fp32."""
    return merged_dir("llama")
