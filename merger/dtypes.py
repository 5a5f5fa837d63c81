"""The dtype table: safetensors names, torch dtypes and the names users type, in one place."""

from __future__ import annotations

from typing import Literal, get_args

import torch

# safetensors header name -> torch dtype
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# What a user names on the command line or in settings: a compute / output dtype.
ComputeDtype = Literal["float32", "bfloat16", "float16"]
OutputDtype = Literal["auto", "float32", "bfloat16", "float16"]  # auto: the base's stored dtype
COMPUTE_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(ComputeDtype)}
OUTPUT_DTYPES: dict[str, torch.dtype | None] = {"auto": None, **COMPUTE_DTYPES}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")
