"""`d2lora serve` refuses bad arguments with one line and exit 2, before starting anything."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "args, words",
    [
        (["--base", "/no/such/model"], "is not a model folder"),
        (["--engine", "nope"], "is not one of"),
    ],
)
def test_bad_serve_arguments_are_one_line_and_exit_2(demo_dir, tmp_path, args, words):
    command = [sys.executable, "-m", "merger.cli", "serve", "--base", str(demo_dir), "--data-dir", str(tmp_path), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and words in done.stderr
