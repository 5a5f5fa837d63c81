"""Per-request adapters on a real vLLM engine: a mixed batch of every kind, each answer its own model's.

One LoRA-enabled vLLM engine for the module, with as many slots as adapters (so every slot is taken
while the base shares the batch).  Each answer must equal transformers' greedy answer on the merger's
merged checkpoint, and the same engine serving that model alone with its fused weights swapped in.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from pathlib import Path

import pytest

from merger.merge import merge
from merger.per_request import write_per_request_form
from service.engines.base import AdapterRef, GenerationRequest, SamplingOptions
from service.engines.weights import SwapPlanner
from service.merging import keep_fused_tensors
from tests.service.conftest import MAX_TOKENS, PROMPTS, engine_settings
from tests.support.adapters import write_random_adapter
from tests.support.references import hf_greedy

pytestmark = pytest.mark.vllm

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (kind, r, targets, extra adapter_config fields); every k = r (2r for D²-LoRA) is at most MAX_RANK
ADAPTERS = {
    "d2-qkvo": ("D2LORA", 4, ["q_proj", "k_proj", "v_proj", "o_proj"], {}),
    "d2-mlp": ("D2LORA", 4, ["q_proj", "gate_proj", "down_proj"], {"rank_pattern": {"down_proj": 2}}),
    "dora-qv": ("DORA", 4, ["q_proj", "v_proj"], {}),
    "dora-all": ("DORA", 8, ALL_LINEAR, {"alpha_pattern": {"o_proj": 4}}),
    "lora-o-up": ("LORA", 8, ["o_proj", "up_proj"], {}),
    "lora-qkv": ("LORA", 4, ["q_proj", "k_proj", "v_proj"], {"use_rslora": True}),
}
MAX_RANK = 8
BASE = "base"


@pytest.fixture(scope="module")
def models(demo_dir, tmp_path_factory) -> dict[str, dict]:
    """name -> {ref: AdapterRef to its per-request form, fused: fused tensors file, answers: transformers'}."""
    root = tmp_path_factory.mktemp("per-request")
    made = {}
    for index, (name, (kind, r, targets, extra)) in enumerate(ADAPTERS.items()):
        artifact = write_random_adapter(
            root / f"{name}-adapter", demo_dir, kind=kind, r=r, seed=20 + index, scale=0.2, targets=targets, **extra
        )
        merged = root / f"{name}-merged"
        merge(demo_dir, artifact, merged, progress=False)
        modules = json.loads((merged / "d2lora_merge.json").read_text())["modules"]
        keep_fused_tensors(merged, tuple(sorted(f"{m}.weight" for m in modules)), root / f"{name}.safetensors")
        write_per_request_form(demo_dir, artifact, root / f"{name}-form")
        made[name] = {
            "ref": AdapterRef(name, index + 1, root / f"{name}-form"),
            "fused": root / f"{name}.safetensors",
            "answers": hf_greedy(merged, PROMPTS, MAX_TOKENS),
        }
    made[BASE] = {"ref": None, "fused": None, "answers": hf_greedy(demo_dir, PROMPTS, MAX_TOKENS)}
    return made


@pytest.fixture(scope="module")
def lora_engine(event_loop_thread, demo_dir):
    """THE engine of this module: vLLM with per-request adapters, one slot per adapter."""
    from service.engines.vllm import VllmEngine

    engine = VllmEngine(engine_settings("vllm", max_loras=len(ADAPTERS), max_lora_rank=MAX_RANK))
    event_loop_thread.run(engine.start(demo_dir))
    yield engine
    event_loop_thread.run(engine.stop())


async def answer(engine, prompt: str, adapter: AdapterRef | None) -> str:
    options = SamplingOptions(max_tokens=MAX_TOKENS, temperature=0)
    request = GenerationRequest(uuid.uuid4().hex, prompt, options, adapter)
    return "".join([chunk.text async for chunk in engine.generate(request)])


async def mixed_batch(engine, models: dict[str, dict], refs: dict[str, AdapterRef | None]) -> dict[str, list[str]]:
    """Every prompt for every model in `refs`, all at once: name -> answers in PROMPTS order."""
    jobs = {(name, p): answer(engine, prompt, ref) for name, ref in refs.items() for p, prompt in enumerate(PROMPTS)}
    done = dict(zip(jobs, await asyncio.gather(*jobs.values()), strict=True))
    return {name: [done[name, p] for p in range(len(PROMPTS))] for name in refs}


async def served_alone(engine, models: dict[str, dict]) -> dict[str, list[str]]:
    """Each model with its fused weights swapped in, no per-request adapter; the base restored at the end."""
    planner, current, answers = SwapPlanner(engine.base), frozenset(), {}
    for name, model in models.items():
        await engine.load_weights(planner.plan(current, model["fused"]))
        current = planner.names_of(model["fused"])
        answers[name] = [await answer(engine, prompt, None) for prompt in PROMPTS]
    await engine.load_weights(planner.plan(current, None))
    return answers


def test_mixed_batch_of_every_kind_equals_each_model_alone(event_loop_thread, lora_engine, models):
    refs = {name: model["ref"] for name, model in models.items()}
    batched = event_loop_thread.run(mixed_batch(lora_engine, models, refs))
    for name, model in models.items():
        assert batched[name] == model["answers"], name
    alone = event_loop_thread.run(served_alone(lora_engine, models))
    assert alone == batched
    again = event_loop_thread.run(mixed_batch(lora_engine, models, refs))  # per-request again, on the restored base
    assert again == batched


def test_more_adapters_than_slots_take_turns(event_loop_thread, lora_engine, models, tmp_path):
    """Eight adapter ids on six slots: vLLM evicts and refills slots between steps; answers stay exact."""
    refs = {name: model["ref"] for name, model in models.items() if name != BASE}
    for extra, source in enumerate(("d2-qkvo", "dora-qv")):
        copy = Path(shutil.copytree(models[source]["ref"].path, tmp_path / source))
        refs[f"{source}-copy"] = AdapterRef(f"{source}-copy", 100 + extra, copy)
    batched = event_loop_thread.run(mixed_batch(lora_engine, models, refs))
    for name, answers in batched.items():
        assert answers == models[name.removesuffix("-copy")]["answers"], name


def test_a_broken_form_is_refused_and_the_engine_serves_on(event_loop_thread, lora_engine, models, tmp_path):
    broken = Path(shutil.copytree(models["d2-qkvo"]["ref"].path, tmp_path / "broken"))
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(Exception, match="broken|safetensors|header"):
        event_loop_thread.run(lora_engine.add_adapter(AdapterRef("broken", 999, broken)))
    assert lora_engine.alive
    assert (
        event_loop_thread.run(answer(lora_engine, PROMPTS[0], models["dora-qv"]["ref"]))
        == (models["dora-qv"]["answers"][0])
    )
