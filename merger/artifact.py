"""An adapter artifact (SPEC §2) parsed, validated, and bound to a base model.

`Adapter.load` checks what the artifact alone can tell (config fields, tensor
names, complete factor sets, finite values); `Adapter.bind` checks it against the
base checkpoint's tensor shapes. Both run before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from merger.archive import (
    DEFAULT_LIMITS,
    ArchiveLimits,
    ArtifactError,
    read_artifact_files,
)
from merger.config import ALL_LINEAR, AdapterConfig, AdapterConfigError
from merger.formula import lora_scaling
from merger.kinds import FACTOR_ALIASES, AdapterKind, Factors, ModuleAdapter, kind_for

KEY_PREFIX = "base_model.model."


def _parse_config(raw: bytes) -> AdapterConfig:
    try:
        return AdapterConfig.from_dict(json.loads(raw.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"adapter_config.json: not valid JSON ({err})") from None
    except TypeError as err:
        raise ArtifactError(f"adapter_config.json: {err}") from None


def _parse_tensors(raw: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(raw)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ArtifactError(f"adapter_model.safetensors: unreadable ({err})") from None


def _split_key(key: str, kind: AdapterKind) -> tuple[str, str]:
    """'base_model.model.P.lora_A.weight' -> ('P', 'lora_A.weight')."""
    if not key.startswith(KEY_PREFIX):
        raise ArtifactError(f"tensor {key!r}: name must start with {KEY_PREFIX!r}")
    body = key[len(KEY_PREFIX) :]
    for suffix in (*FACTOR_ALIASES, *kind.factor_names):
        name = FACTOR_ALIASES.get(suffix, suffix)
        if body.endswith("." + suffix) and name in kind.factor_names:
            return body[: -len(suffix) - 1], name
    raise ArtifactError(f"tensor {key!r}: not a {kind.name} factor (expected one of {', '.join(kind.factor_names)})")


def _check_tensor(key: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise ArtifactError(f"tensor {key!r}: dtype {tensor.dtype} is not floating point")
    if not bool(torch.isfinite(tensor).all()):
        raise ArtifactError(f"tensor {key!r}: holds NaN or infinite values")


def _check_complete(modules: dict[str, Factors], kind: AdapterKind) -> None:
    if not modules:
        raise ArtifactError("adapter_model.safetensors holds no tensors")
    for path, factors in modules.items():
        missing = [n for n in kind.factor_names if n not in factors]
        if missing:
            raise ArtifactError(f"{path}: missing factor tensors {', '.join(missing)}")


def _group_modules(tensors: dict[str, torch.Tensor], kind: AdapterKind) -> dict[str, Factors]:
    """module path -> factor name -> tensor, every tensor checked and every set complete."""
    modules: dict[str, Factors] = {}
    for key, tensor in tensors.items():
        path, name = _split_key(key, kind)
        _check_tensor(key, tensor)
        factors = modules.setdefault(path, {})
        if name in factors:
            raise ArtifactError(f"tensor {key!r}: {path}.{name} is given twice")
        factors[name] = tensor
    _check_complete(modules, kind)
    return modules


@dataclasses.dataclass(frozen=True)
class Adapter:
    config: AdapterConfig
    kind: AdapterKind
    modules: dict[str, Factors]  # module path -> factor name -> tensor

    @classmethod
    def load(cls, path: str | Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> Adapter:
        files = read_artifact_files(path, limits)
        try:
            config = _parse_config(files.config)
            kind = kind_for(config)
        except AdapterConfigError as err:
            raise ArtifactError(f"adapter_config.json: {err}") from None
        modules = _group_modules(_parse_tensors(files.weights), kind)
        adapter = cls(config, kind, modules)
        adapter._check_targets()
        return adapter

    def _check_targets(self) -> None:
        for path in self.modules:
            if not self.config.targets(path):
                raise ArtifactError(f"{path}: has factors but does not match target_modules")

    def bind(self, base_shapes: dict[str, tuple[int, ...]]) -> list[ModuleAdapter]:
        """Validate against the base checkpoint's shapes; one ModuleAdapter per module."""
        self._check_coverage(base_shapes)
        return [self._bind_module(path, base_shapes) for path in sorted(self.modules)]

    def _check_coverage(self, base_shapes: dict[str, tuple[int, ...]]) -> None:
        if self.config.target_modules == ALL_LINEAR:
            return
        for key, shape in base_shapes.items():
            path = key.removesuffix(".weight")
            if key.endswith(".weight") and len(shape) == 2 and self.config.targets(path) and path not in self.modules:
                raise ArtifactError(f"{path}: matches target_modules but the artifact has no factors for it")

    def _bind_module(self, path: str, base_shapes: dict[str, tuple[int, ...]]) -> ModuleAdapter:
        weight_key = f"{path}.weight"
        if weight_key not in base_shapes:
            raise ArtifactError(f"{path}: no such module in the base model (no tensor {weight_key!r})")
        shape = base_shapes[weight_key]
        if len(shape) != 2:
            raise ArtifactError(f"{path}: base weight has shape {list(shape)}, not a 2-D Linear weight")
        out_features, in_features = reversed(shape) if self.config.fan_in_fan_out else shape
        r = self.config.rank_for(path)
        factors = self.modules[path]
        for name, expected in self.kind.factor_shapes(r, out_features, in_features).items():
            if tuple(factors[name].shape) != expected:
                raise ArtifactError(
                    f"{path}.{name}: shape {list(factors[name].shape)} does not match {list(expected)} "
                    f"(r={r}, base weight {list(shape)})"
                )
        scaling = lora_scaling(self.config.alpha_for(path), r, self.config.use_rslora)
        return ModuleAdapter(path, factors, scaling, self.config.tau, self.config.fan_in_fan_out)
