"""`d2lora export`: an adapter rewritten in another format that serves the same fused weight Ŵ.

Formats are a registry of small classes, each writing an output folder from the
base checkpoint (streamed one tensor at a time) and the adapter:

- `peft-dora`: an exact PEFT DoRA adapter of rank k (SPEC §1), so any DoRA-capable
  server or PEFT's own `merge_and_unload` reproduces Ŵ, D²-LoRA included.
- `per-request`: the form d2lora-serve's vLLM plugin applies per request
  (merger.per_request).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import ClassVar

import torch

from merger.archive import DEFAULT_LIMITS, ArchiveLimits
from merger.artifact import KEY_PREFIX
from merger.checkpoint import CheckpointReader
from merger.errors import D2LoraError
from merger.merge import atomic_output_dir, check_out_dir
from merger.per_request import (
    bound_modules,
    load_adapter,
    low_rank_config,
    save_safetensors,
    write_json,
    write_per_request_form,
)


class ExportError(D2LoraError):
    """An export that cannot be made (unknown format)."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    seconds: float
    modules: int
    rank: int


class ExportFormat:
    name: ClassVar[str]
    help: ClassVar[str]

    def write(self, base_dir: Path, adapter_path: Path, out_dir: Path, limits: ArchiveLimits) -> ExportResult:
        raise NotImplementedError


class PeftDoraFormat(ExportFormat):
    name = "peft-dora"
    help = "an exact PEFT DoRA adapter of rank k (lora_A, lora_B, lora_magnitude_vector; scaling 1)"

    def write(self, base_dir: Path, adapter_path: Path, out_dir: Path, limits: ArchiveLimits) -> ExportResult:
        start = time.perf_counter()
        check_out_dir(out_dir)
        adapter = load_adapter(adapter_path, limits)
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        with CheckpointReader(base_dir) as reader:
            for module, w0 in bound_modules(reader, adapter):
                dora = adapter.kind.dora(w0, module)
                prefix = f"{KEY_PREFIX}{module.path}"
                tensors[f"{prefix}.lora_A.weight"] = dora.a.contiguous()  # (k, in)
                tensors[f"{prefix}.lora_B.weight"] = dora.b.contiguous()  # (out, k)
                tensors[f"{prefix}.lora_magnitude_vector"] = dora.magnitude.contiguous()  # (out,)
                ranks[module.path] = dora.a.shape[0]
        with atomic_output_dir(out_dir) as tmp:
            write_json(tmp / "adapter_config.json", low_rank_config(adapter, ranks, use_dora=True))
            save_safetensors(tmp / "adapter_model.safetensors", tensors)
        return ExportResult(out_dir, time.perf_counter() - start, len(ranks), max(ranks.values()))


class PerRequestFormat(ExportFormat):
    name = "per-request"
    help = "d2lora-serve's per-request form: a rank-k PEFT LoRA (A, B̃) plus the row scales d in a side file"

    def write(self, base_dir: Path, adapter_path: Path, out_dir: Path, limits: ArchiveLimits) -> ExportResult:
        result = write_per_request_form(base_dir, adapter_path, out_dir, limits)
        return ExportResult(result.out_dir, result.seconds, result.modules, result.rank)


EXPORT_FORMATS: dict[str, type[ExportFormat]] = {f.name: f for f in (PeftDoraFormat, PerRequestFormat)}


def export(
    base_dir: str | Path,
    adapter_path: str | Path,
    out_dir: str | Path,
    format: str = PeftDoraFormat.name,
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> ExportResult:
    """Write the adapter, bound to the base at base_dir, in `format` into out_dir (which must not exist)."""
    if format not in EXPORT_FORMATS:
        raise ExportError(f"--format: {format!r} is not one of {', '.join(EXPORT_FORMATS)}")
    return EXPORT_FORMATS[format]().write(Path(base_dir), Path(adapter_path), Path(out_dir), limits)
