"""The vLLM worker extension that swaps weights (loaded into each worker by qualname).

The worker opens the safetensors files itself: only paths and tensor names
cross the process boundary, never tensor data.  `reload_weights` runs the
model's own `load_weights` (stacking q/k/v into qkv_proj, casting, and the
CPU repacking of Linear weights), so a packed module must receive all of its
parts in one call; `VllmEngine` makes sure it does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from safetensors import safe_open
from vllm.config import set_current_vllm_config
from vllm.model_executor.model_loader.reload.layerwise import (
    finalize_layerwise_reload,
    initialize_layerwise_reload,
)


class SwapWorkerExtension:
    """Mixed into vLLM's Worker (worker_extension_cls); `self` is the worker."""

    def d2lora_packed_modules(self) -> dict[str, list[str]]:
        """The model's packed modules, e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}."""
        model = self.model_runner.get_model()
        return {packed: list(parts) for packed, parts in getattr(model, "packed_modules_mapping", {}).items()}

    def d2lora_load(self, files: list[tuple[str, list[str]]]) -> int:
        """Reload the named tensors of each (safetensors path, names); returns how many were loaded.

        Only the layers those tensors feed are re-initialised and re-processed
        (vLLM's own `reload_weights` does that for every layer of the model).
        """
        model = self.model_runner.get_model()
        layers = _target_layers(model, [name for _, names in files for name in names])
        with set_current_vllm_config(self.vllm_config):
            for layer in layers:
                initialize_layerwise_reload(layer)
            model.load_weights(_read_tensors(files))
            for layer in layers:
                finalize_layerwise_reload(layer, self.vllm_config.model_config)
        return sum(len(names) for _, names in files)


def _target_layers(model: torch.nn.Module, names: list[str]) -> list[torch.nn.Module]:
    """The vLLM modules that checkpoint tensors `names` load into (q_proj -> qkv_proj)."""
    packed_of = {part: packed for packed, parts in getattr(model, "packed_modules_mapping", {}).items()
                 for part in parts}
    paths = set()
    for name in names:
        parent, _, leaf = name.rpartition(".")[0].rpartition(".")
        paths.add(f"{parent}.{packed_of.get(leaf, leaf)}")
    return [model.get_submodule(path) for path in sorted(paths)]


def _read_tensors(files: list[tuple[str, list[str]]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in name order, so each layer's parts arrive together."""
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(path, framework="pt", device="cpu")) for path, _ in files}
        owner = {name: path for path, names in files for name in names}
        for name in sorted(owner):
            yield name, handles[owner[name]].get_tensor(name)
