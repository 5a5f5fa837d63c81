"""Shared service fixtures: the demo model, merged random adapters, and ONE engine per kind per session.

Async code runs on one event loop in a background thread (`event_loop.run(coro)`),
so session-scoped engines and the tests' requests share a loop without a plugin.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import NamedTuple

import pytest

from merger.demo import build_demo_model
from merger.merge import merge
from merger.per_request import write_per_request_form
from service.merging import keep_fused_tensors
from service.settings import Settings
from tests.support.adapters import write_random_adapter
from tests.support.references import hf_greedy

# name -> (target modules, seed): different target sets, so a swap must put tensors back to the base
ADAPTERS = {
    "qv": (["q_proj", "v_proj"], 1),
    "qkvo": (["q_proj", "k_proj", "v_proj", "o_proj"], 2),
    "o-mlp": (["o_proj", "gate_proj", "down_proj"], 3),
}  # gate without up: the engine adds the base's up_proj
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot")
MAX_TOKENS = 8


class EventLoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def event_loop_thread():
    loop = EventLoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return build_demo_model(Settings().cache_dir)


class ServedFiles(NamedTuple):
    """What the registry keeps of one adapter, and the merger's whole merged checkpoint (the reference)."""

    merged: Path  # merged checkpoint folder
    fused: Path  # fused target tensors (merged mode)
    form: Path  # per-request form folder (batched mode)


def fused_adapter(base: Path, root: Path, name: str, targets: list[str], seed: int) -> ServedFiles:
    """A random D²-LoRA adapter merged, its fused tensors kept, its per-request form written."""
    adapter = write_random_adapter(root / f"{name}-adapter", base, seed=seed, scale=0.2, targets=targets)
    merged = root / f"{name}-merged"
    merge(base, adapter, merged, progress=False)
    keys = tuple(sorted(f"{key}.weight" for key in _fused_modules(merged)))
    keep_fused_tensors(merged, keys, root / f"{name}.safetensors")
    write_per_request_form(base, adapter, root / f"{name}-form")
    return ServedFiles(merged, root / f"{name}.safetensors", root / f"{name}-form")


def _fused_modules(merged: Path) -> list[str]:
    import json

    return json.loads((merged / "d2lora_merge.json").read_text())["modules"]


@pytest.fixture(scope="session")
def adapters(demo_dir, tmp_path_factory) -> dict[str, ServedFiles]:
    """name -> its merged checkpoint, fused tensors and per-request form."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: fused_adapter(demo_dir, root, name, targets, seed) for name, (targets, seed) in ADAPTERS.items()}


@pytest.fixture(scope="session")
def references(demo_dir, adapters) -> dict[str, list[str]]:
    """model name -> transformers greedy answers to PROMPTS on the merger's merged checkpoint (or the base)."""
    answers = {demo_dir.resolve().name: hf_greedy(demo_dir, PROMPTS, MAX_TOKENS)}
    answers.update({name: hf_greedy(files.merged, PROMPTS, MAX_TOKENS) for name, files in adapters.items()})
    return answers


def engine_settings(engine: str, **overrides) -> Settings:
    fields = {
        "engine": engine,
        "dtype": "float32",
        "kv_cache_gib": 1,
        "max_num_seqs": 16,
        "max_model_len": 512,
        "max_resident": 1,
        "max_waiting": 24,
        "time_slice_s": 0.5,
    }
    return Settings(**{**fields, **overrides})


def _start_scheduler(event_loop_thread, demo_dir, adapters, engine: str, **overrides):
    from service.engines import engine_factory
    from service.scheduling.scheduler import Scheduler

    async def start():
        settings = engine_settings(engine, **overrides)
        scheduler = await Scheduler.create(settings, demo_dir, engine_factory(settings))
        for name, files in adapters.items():
            await scheduler.add_model(name, files.fused, files.form)
        return scheduler

    return event_loop_thread.run(start())


@pytest.fixture(scope="session")
def vllm_scheduler(event_loop_thread, demo_dir, adapters):
    """THE vLLM engine of the session, behind a scheduler serving the base and every adapter: auto mode, so
    mixed traffic is batched with per-request adapters and one adapter alone for a second gets merged weights."""
    scheduler = _start_scheduler(event_loop_thread, demo_dir, adapters, "vllm", merged_after_s=1.0)
    yield scheduler
    event_loop_thread.run(scheduler.stop())


@pytest.fixture(scope="session")
def transformers_scheduler(event_loop_thread, demo_dir, adapters):
    scheduler = _start_scheduler(event_loop_thread, demo_dir, adapters, "transformers")
    yield scheduler
    event_loop_thread.run(scheduler.stop())


@pytest.fixture(params=["vllm", "transformers"])
def scheduler(request):
    """Each engine behind its scheduler (the interface tests run on both)."""
    return request.getfixturevalue(f"{request.param}_scheduler")


# the live server (HTTP layer tests): ONE `d2lora serve` subprocess per session, restarted in place

UPLOAD_CAP_BYTES = 32 << 20
LIVE_MERGED_AFTER_S = 1.0  # tests then see both modes on the live server


@pytest.fixture(scope="session")
def live_server(demo_dir, tmp_path_factory):
    """`d2lora serve` on the demo model (vLLM, auto mode: one adapter alone for LIVE_MERGED_AFTER_S gets merged)."""
    from tests.support.live import LiveServer

    server = LiveServer(
        demo_dir,
        tmp_path_factory.mktemp("data"),
        tmp_path_factory.mktemp("logs"),
        D2LORA_MAX_UPLOAD_BYTES=str(UPLOAD_CAP_BYTES),
        D2LORA_MERGED_AFTER_S=str(LIVE_MERGED_AFTER_S),
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def artifacts(adapters) -> dict[str, Path]:
    """name -> the D²-LoRA artifact folder behind each of ADAPTERS (what a user uploads)."""
    return {name: files.merged.parent / f"{name}-adapter" for name, files in adapters.items()}


@pytest.fixture(scope="session")
def uploaded(live_server, artifacts, tmp_path_factory) -> dict[str, dict]:
    """Every adapter of ADAPTERS uploaded to the live server (one as a .tar.gz archive): name -> record."""
    from tests.support.uploading import upload_archive, upload_files

    archive_dir = tmp_path_factory.mktemp("archives")
    records = {}
    for name, folder in artifacts.items():
        upload = upload_archive if name == "qkvo" else upload_files
        response = upload(live_server, name, folder, archive_dir=archive_dir)
        assert response.status_code == 201, response.text
        records[name] = response.json()
    return records
