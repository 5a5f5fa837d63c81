"""The dtype table: safetensors names, torch dtypes and the names users type, in one place.

The names (`ComputeDtype`, `OutputDtype`) need no torch, so the settings class and other light
modules import them without loading it; the tables of torch dtypes are built on first use
(module `__getattr__`, PEP 562).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    import torch

# What a user names on the command line or in settings: a compute / output dtype.
ComputeDtype = Literal["float32", "bfloat16", "float16"]
OutputDtype = Literal["auto", "float32", "bfloat16", "float16"]  # auto: the base's stored dtype

# safetensors header name -> torch attribute name
_SAFETENSORS = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


@functools.cache
def _tables() -> dict[str, Any]:
    import torch

    safetensors = {name: getattr(torch, attr) for name, attr in _SAFETENSORS.items()}
    compute = {name: getattr(torch, name) for name in get_args(ComputeDtype)}
    return {
        "SAFETENSORS_DTYPES": safetensors,  # "BF16" -> torch.bfloat16
        "SAFETENSORS_NAMES": {v: k for k, v in safetensors.items()},  # torch.bfloat16 -> "BF16"
        "COMPUTE_DTYPES": compute,  # "bfloat16" -> torch.bfloat16
        "OUTPUT_DTYPES": {"auto": None, **compute},  # as COMPUTE_DTYPES, "auto" -> None
    }


if TYPE_CHECKING:
    SAFETENSORS_DTYPES: dict[str, torch.dtype]
    SAFETENSORS_NAMES: dict[torch.dtype, str]
    COMPUTE_DTYPES: dict[str, torch.dtype]
    OUTPUT_DTYPES: dict[str, torch.dtype | None]


_LAZY = frozenset({"SAFETENSORS_DTYPES", "SAFETENSORS_NAMES", "COMPUTE_DTYPES", "OUTPUT_DTYPES"})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return _tables()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")
