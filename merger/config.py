"""adapter_config.json as a validated dataclass (SPEC §2).

PEFT writes many more fields than the merge needs; unknown ones are ignored,
known ones are type-checked and range-checked, and every error names the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from merger.errors import D2LoraError


class AdapterConfigError(D2LoraError):
    """adapter_config.json is missing a field or holds a bad value."""


ALL_LINEAR = "all-linear"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check_regex(field: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise AdapterConfigError(f"{field}: bad regular expression ({err})") from None


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """PEFT's rule: the first key that matches the module path at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _matches_names(module: str, names: tuple[str, ...]) -> bool:
    """PEFT's list matching: the module path is a name or ends with `.name`."""
    return any(module == n or module.endswith("." + n) for n in names)


def _layer_index(module: str, layers_pattern: tuple[str, ...]) -> int | None:
    """The first numbered path segment after a layers pattern (any segment when none is given), as PEFT finds it."""
    patterns = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in layers_pattern] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    for pattern in patterns:
        match = re.match(pattern, module)
        if match:
            return int(match["idx"])
    return None


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    peft_type: str
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str
    tau: float = 0.5
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    base_model_name_or_path: str | None = None
    exclude_modules: tuple[str, ...] | str = ()
    layers_to_transform: tuple[int, ...] | int = ()
    layers_pattern: tuple[str, ...] | str = ()

    def __post_init__(self) -> None:
        if not isinstance(self.peft_type, str) or not self.peft_type:
            raise AdapterConfigError("peft_type: must be a non-empty string")
        self._check_rank("r", self.r)
        self._check_alpha("lora_alpha", self.lora_alpha)
        if not _is_number(self.tau) or self.tau < 0:
            raise AdapterConfigError(f"tau: must be a finite number >= 0, got {self.tau!r}")
        for flag in ("use_rslora", "fan_in_fan_out", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise AdapterConfigError(f"{flag}: must be true or false")
        self._check_targets()
        self._check_patterns()
        self._check_layer_selection()
        if self.base_model_name_or_path is not None and not isinstance(self.base_model_name_or_path, str):
            raise AdapterConfigError("base_model_name_or_path: must be a string")

    @staticmethod
    def _check_rank(field: str, value: Any) -> None:
        if not _is_int(value) or not 0 < value <= 65536:
            raise AdapterConfigError(f"{field}: must be an integer in [1, 65536], got {value!r}")

    @staticmethod
    def _check_alpha(field: str, value: Any) -> None:
        if not _is_number(value) or value == 0:
            raise AdapterConfigError(f"{field}: must be a finite non-zero number, got {value!r}")

    def _check_targets(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str) and targets:
            _check_regex("target_modules", targets)
            return
        if not isinstance(targets, tuple) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise AdapterConfigError("target_modules: must be a non-empty list of module names or a regular expression")

    def _check_patterns(self) -> None:
        for field, check in (("rank_pattern", self._check_rank), ("alpha_pattern", self._check_alpha)):
            patterns = getattr(self, field)
            if not isinstance(patterns, dict):
                raise AdapterConfigError(f"{field}: must be an object")
            for key, value in patterns.items():
                _check_regex(f"{field}[{key!r}]", key)
                check(f"{field}[{key!r}]", value)

    def _check_layer_selection(self) -> None:
        if isinstance(self.exclude_modules, str):
            _check_regex("exclude_modules", self.exclude_modules)
        elif not isinstance(self.exclude_modules, tuple) or not all(
            isinstance(m, str) and m for m in self.exclude_modules
        ):
            raise AdapterConfigError("exclude_modules: must be a list of module names or a regular expression")
        layers = self.layers_to_transform
        if not all(_is_int(i) and i >= 0 for i in (layers if isinstance(layers, tuple) else (layers,))):
            raise AdapterConfigError(f"layers_to_transform: must be a layer index or a list of them, got {layers!r}")
        patterns = (self.layers_pattern,) if isinstance(self.layers_pattern, str) else self.layers_pattern
        if not isinstance(patterns, tuple) or not all(isinstance(p, str) for p in patterns):
            raise AdapterConfigError("layers_pattern: must be a string or a list of strings")
        for pattern in patterns:
            _check_regex("layers_pattern", pattern)

    @property
    def kind(self) -> str:
        """The registry key of the adapter kind: D2LORA, LORA or DORA."""
        return "DORA" if self.peft_type == "LORA" and self.use_dora else self.peft_type

    def rank_for(self, module: str) -> int:
        key = _pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = _pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def targets(self, module: str) -> bool:
        """PEFT's matching: exclusions first; a string is a full regex match; a list matches
        name suffixes, restricted to `layers_to_transform` when given."""
        if self._excluded(module):
            return False
        if isinstance(self.target_modules, str):
            return self.target_modules == ALL_LINEAR or re.fullmatch(self.target_modules, module) is not None
        return _matches_names(module, self.target_modules) and self._in_transformed_layer(module)

    def _excluded(self, module: str) -> bool:
        if isinstance(self.exclude_modules, str):
            return re.fullmatch(self.exclude_modules, module) is not None
        return _matches_names(module, self.exclude_modules)

    def _in_transformed_layer(self, module: str) -> bool:
        layers = self.layers_to_transform
        if layers == ():
            return True
        patterns = (self.layers_pattern,) if isinstance(self.layers_pattern, str) else self.layers_pattern
        index = _layer_index(module, tuple(p for p in patterns if p))
        return index is not None and index in (layers if isinstance(layers, tuple) else (layers,))

    @classmethod
    def from_dict(cls, raw: Any) -> AdapterConfig:
        if not isinstance(raw, dict):
            raise AdapterConfigError("adapter_config.json: must hold a JSON object")
        for required in ("peft_type", "r", "lora_alpha", "target_modules"):
            if raw.get(required) is None:
                raise AdapterConfigError(f"{required}: missing")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in names and v is not None}
        for field in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"):
            if field in values:
                values[field] = _as_tuple(values[field])
        values["peft_type"] = str(values["peft_type"]).upper()
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
