"""Fixtures of the merger tests: the tiny Llama and a valid adapter for it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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
