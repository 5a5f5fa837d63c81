"""`d2lora serve` refuses bad arguments and settings with one line and exit 2, before starting anything."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a live server or engine per module (tests/conftest.py: the tiers)

BAD_STARTS = [
    ([], {"D2LORA_BASE_DIR": "/no/such/model"}, "is not a model folder"),
    (["--base", "/no/such/model"], {}, "--base: /no/such/model is not a model folder"),
    (["--engine", "nope"], {}, "--engine='nope': Input should be 'vllm' or 'transformers'"),
    ([], {"D2LORA_DTYPE": "fp64"}, "D2LORA_DTYPE='fp64': Input should be 'float32', 'bfloat16' or 'float16'"),
    ([], {"D2LORA_MERGE_DTYPE": "int8"}, "D2LORA_MERGE_DTYPE='int8': Input should be 'auto', 'float32'"),
    ([], {"D2LORA_MAX_NUM_SEQS": "0"}, "D2LORA_MAX_NUM_SEQS='0': Input should be greater than 0"),
    ([], {"D2LORA_MAX_MODEL_LEN": "1000000"}, "D2LORA_MAX_MODEL_LEN=1000000 is longer than the model's context"),
]


@pytest.mark.parametrize("args, env, words", BAD_STARTS)
def test_bad_serve_arguments_are_one_line_and_exit_2(demo_dir, tmp_path, args, env, words):
    base = [] if "D2LORA_BASE_DIR" in env or "--base" in args else ["--base", str(demo_dir)]
    command = [sys.executable, "-m", "service.cli", "serve", *base, "--data-dir", str(tmp_path), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and words in done.stderr, done.stderr
    assert not any(tmp_path.iterdir())  # nothing started, nothing written
