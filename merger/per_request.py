"""The per-request form of an adapter (SPEC §1): what a server loads to apply it per request, unmerged.

For every adapted module, Ŵ x = d ⊙ (W0 x) + B̃ (A x).  The folder is a PEFT LoRA
adapter that vLLM loads as it is (rank k, lora_alpha = k so its scaling is 1,
lora_A = A, lora_B = B̃), plus the row scales d in a side file that only a
server applying them reads (d2lora-serve's vLLM plugin):

    adapter_config.json             peft_type LORA, r = lora_alpha = k (rank_pattern / alpha_pattern where k varies)
    adapter_model.safetensors       base_model.model.P.lora_A.weight (k, in), base_model.model.P.lora_B.weight (out, k)
    d2lora_row_scale.safetensors    P -> d (out,) fp32, only modules whose d is not exactly 1
    d2lora_per_request.json         kind, modules, rank: provenance

Without the side file (plain LoRA, d = 1) the folder is an ordinary LoRA adapter.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from merger.archive import DEFAULT_LIMITS, ArchiveLimits
from merger.artifact import KEY_PREFIX, Adapter
from merger.checkpoint import CheckpointReader
from merger.errors import D2LoraError
from merger.fs import save_atomic, write_atomic
from merger.kinds import ModuleAdapter, RowScaledLowRank
from merger.memory import giving_back
from merger.merge import atomic_output_dir, check_float_targets, check_out_dir

ROW_SCALE_NAME = "d2lora_row_scale.safetensors"
PROVENANCE_NAME = "d2lora_per_request.json"
FORMAT_VERSION = 1


class PerRequestError(D2LoraError):
    """A per-request form folder that cannot be read."""


@dataclasses.dataclass(frozen=True)
class PerRequestResult:
    out_dir: Path
    seconds: float
    modules: int
    rank: int  # the largest k over modules: what the server's max_lora_rank must hold
    row_scaled_modules: int  # modules with d ≠ 1 (0 for plain LoRA)


def load_adapter(adapter: str | Path | Adapter, limits: ArchiveLimits = DEFAULT_LIMITS) -> Adapter:
    return adapter if isinstance(adapter, Adapter) else Adapter.load(Path(adapter), limits)


def bound_modules(reader: CheckpointReader, adapter: Adapter) -> Iterator[tuple[ModuleAdapter, torch.Tensor]]:
    """Every adapted module with its base weight as stored, read one tensor at a time (the free memory
    given back after each module's work)."""
    bound = adapter.bind(reader.shapes())
    check_float_targets(reader, bound)
    for module in giving_back(bound):
        yield module, reader.read(module.weight_key)


def rank_config(ranks: dict[str, int]) -> dict:
    """r = lora_alpha = the largest k; modules of smaller k get the same value in both patterns: scaling 1 each."""
    top = max(ranks.values())
    pattern = {re.escape(path): k for path, k in sorted(ranks.items()) if k != top}
    return {"r": top, "lora_alpha": top, "rank_pattern": pattern, "alpha_pattern": dict(pattern)}


def low_rank_config(adapter: Adapter, ranks: dict[str, int], use_dora: bool) -> dict:
    """adapter_config.json of a rank-k PEFT LoRA (or DoRA) adapter with scaling 1 on the modules in `ranks`."""
    return {
        "peft_type": "LORA",
        **rank_config(ranks),
        "use_rslora": False,
        "use_dora": use_dora,
        "fan_in_fan_out": adapter.config.fan_in_fan_out,
        "bias": "none",
        "target_modules": sorted(ranks),
        "base_model_name_or_path": adapter.config.base_model_name_or_path,
    }


def write_json(path: Path, value: dict) -> None:
    write_atomic(path, json.dumps(value, indent=2) + "\n")


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    save_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}))


def _row_scale_metadata(scales: dict[str, torch.Tensor], kind: str) -> dict[str, str]:
    return {"format": "d2lora-row-scale", "version": str(FORMAT_VERSION), "kind": kind, "modules": str(len(scales))}


class PerRequestForm:
    """The per-request form of one adapter, a module at a time (`add`), then written as a folder (`write`).

    Fed by write_per_request_form, or by merger.merge.fuse_into_file's on_form as it fuses (an upload
    computes each module's row scale once for its fused tensor and its form).
    """

    def __init__(self) -> None:
        self.factors: dict[str, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}
        self.ranks: dict[str, int] = {}

    def add(self, module: ModuleAdapter, form: RowScaledLowRank) -> None:
        self.factors[f"{KEY_PREFIX}{module.path}.lora_A.weight"] = form.a.contiguous()  # (k, in)
        self.factors[f"{KEY_PREFIX}{module.path}.lora_B.weight"] = form.b.contiguous()  # (out, k)
        self.ranks[module.path] = form.a.shape[0]
        if form.row_scale is not None and not bool((form.row_scale == 1).all()):
            self.scales[module.path] = form.row_scale.contiguous()  # (out,)

    def write(self, out_dir: Path, adapter: Adapter) -> None:
        """The folder, atomically (out_dir must not exist)."""
        if not self.ranks:
            raise PerRequestError(f"{out_dir}: no module was added to the per-request form")
        check_out_dir(out_dir)
        with atomic_output_dir(out_dir) as tmp:
            write_json(tmp / "adapter_config.json", low_rank_config(adapter, self.ranks, use_dora=False))
            save_safetensors(tmp / "adapter_model.safetensors", self.factors)
            if self.scales:
                save_safetensors(tmp / ROW_SCALE_NAME, self.scales, _row_scale_metadata(self.scales, adapter.kind.name))
            provenance = {"format_version": FORMAT_VERSION, "kind": adapter.kind.name, "rank": self.rank}
            write_json(
                tmp / PROVENANCE_NAME, {**provenance, "modules": sorted(self.ranks), "row_scaled": sorted(self.scales)}
            )

    @property
    def rank(self) -> int:
        return max(self.ranks.values())


def write_per_request_form(
    base_dir: str | Path,
    adapter: str | Path | Adapter,
    out_dir: str | Path,
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> PerRequestResult:
    """Write the adapter's per-request form for the base at base_dir into out_dir (which must not exist)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    adapter = load_adapter(adapter, limits)
    form = PerRequestForm()
    with CheckpointReader(base_dir) as reader:
        for module, w0 in bound_modules(reader, adapter):
            form.add(module, adapter.kind.row_scaled(w0, module))
    form.write(out_dir, adapter)
    return PerRequestResult(out_dir, time.perf_counter() - start, len(form.ranks), form.rank, len(form.scales))


def read_row_scales(folder: str | Path) -> dict[str, torch.Tensor]:
    """Module path -> d (out,) fp32 of a per-request form folder; {} when every d is 1."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / ROW_SCALE_NAME
    if not path.is_file():
        return {}
    try:
        scales = load_file(path)
    except (SafetensorError, OSError) as err:
        raise PerRequestError(f"{path}: unreadable ({err})") from None
    bad = [name for name, d in scales.items() if d.dim() != 1 or d.dtype != torch.float32]
    if bad:
        raise PerRequestError(f"{path}: {bad[0]!r} is not a 1-D float32 row scale")
    return scales
