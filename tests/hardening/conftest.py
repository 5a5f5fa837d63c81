"""Hardening fixtures: a tiny base, three random D²-LoRA adapters, their reference answers, live servers.

Reference answers (SPEC §6) are transformers' greedy completions on the
merger's merged checkpoint of each adapter (and on the base itself).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from merger.merge import merge
from tests.support.adapters import write_random_adapter
from tests.support.live import LiveServer
from tests.support.references import hf_greedy

ADAPTERS = {
    "qv": (["q_proj", "v_proj"], 1),
    "qkvo": (["q_proj", "k_proj", "v_proj", "o_proj"], 2),
    "o": (["o_proj"], 3),
}
PROMPTS = ("The capital of France is", "Question: what is two plus two?", "A quick brown fox")
MAX_TOKENS = 8


@pytest.fixture(scope="session")
def tiny_dir(tiny_base) -> Path:
    return tiny_base("llama")


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """name -> a D²-LoRA artifact folder for the tiny base (what a user uploads)."""
    root = tmp_path_factory.mktemp("hardening-adapters")
    return {
        name: write_random_adapter(root / name, tiny_dir, seed=seed, scale=0.5, targets=targets)
        for name, (targets, seed) in ADAPTERS.items()
    }


@pytest.fixture(scope="session")
def tiny_references(tiny_dir, tiny_artifacts, tmp_path_factory) -> dict[str, list[str]]:
    """model name -> greedy answers to PROMPTS (the base under its own name)."""
    root = tmp_path_factory.mktemp("hardening-merged")
    answers = {tiny_dir.resolve().name: hf_greedy(tiny_dir, PROMPTS, MAX_TOKENS)}
    for name, artifact in tiny_artifacts.items():
        merge(tiny_dir, artifact, root / name, progress=False)
        answers[name] = hf_greedy(root / name, PROMPTS, MAX_TOKENS)
    return answers


@pytest.fixture(scope="session")
def start_server(tiny_dir, tmp_path_factory):
    """Factory: start_server(**D2LORA_env) -> a started transformers-engine server; all stopped at the end."""
    servers = []

    def start(data_dir: Path | None = None, **env: str) -> LiveServer:
        server = LiveServer(
            tiny_dir,
            data_dir or tmp_path_factory.mktemp("data"),
            tmp_path_factory.mktemp("logs"),
            engine="transformers",
            **env,  # max_model_len: the tiny model's own 256 positions (the default)
        )
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.kill()


UPLOAD_CAP_BYTES = 4 << 20
MAX_NUM_SEQS = 2
MAX_WAITING = 4


@pytest.fixture(scope="session")
def main_server(start_server, tiny_artifacts) -> LiveServer:
    """One server most tests share: 2 running + 4 waiting at most, a 4 MiB upload cap, every adapter uploaded."""
    from tests.support.uploading import upload_files

    server = start_server(
        D2LORA_MAX_NUM_SEQS=str(MAX_NUM_SEQS),
        D2LORA_MAX_WAITING=str(MAX_WAITING),
        D2LORA_TIME_SLICE_S="0.5",
        D2LORA_MAX_UPLOAD_BYTES=str(UPLOAD_CAP_BYTES),
    )
    for name, artifact in tiny_artifacts.items():
        response = upload_files(server, name, artifact)
        assert response.status_code == 201, response.text
    return server
