"""Tiny checkpoints shared by the training tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.tiny import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")
