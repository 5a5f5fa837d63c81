"""The blocking part of an upload, run in a worker thread: validate, merge, verify, keep the fused tensors.

Nothing here touches the registry or the event loop; the caller turns the
result (or the D2LoraError) into a record.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from safetensors.torch import save_file

from merger.archive import ArchiveLimits
from merger.artifact import Adapter
from merger.checkpoint import CheckpointReader
from merger.errors import D2LoraError
from merger.fs import save_atomic
from merger.merge import merge

MERGED_DIR = "merged"
FUSED_FILE = "fused.safetensors"


class BaseMismatchError(D2LoraError):
    """The adapter says it was trained on another base model."""


class EquivalenceError(D2LoraError):
    """Merged and unmerged outputs disagree beyond the thresholds."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class CheckedAdapter:
    kind: str
    base_model: str | None  # base_model_name_or_path from its config
    weight_keys: tuple[str, ...]  # the base tensors it changes, e.g. model.layers.0.self_attn.q_proj.weight
    warnings: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class MergeOutcome:
    seconds: float
    equivalence: dict  # EquivalenceReport.to_dict()
    max_abs_logit_diff: float


def model_stem(name_or_path: str) -> str:
    """'HuggingFaceTB/SmolLM2-135M-Instruct' and '/models/smollm2-135m-instruct/' -> 'smollm2-135m-instruct'."""
    return Path(name_or_path.rstrip("/\\")).name.lower()


def check_base_name(adapter_base: str | None, served_base: str, allow_mismatch: bool) -> tuple[str, ...]:
    """Refuse an adapter that names another base (unless allowed); warn when it names none."""
    if not adapter_base:
        return ("adapter_config.json has no base_model_name_or_path; shapes fit the served base",)
    if model_stem(adapter_base) == model_stem(served_base):
        return ()
    message = f"base_model_name_or_path {adapter_base!r} is not the served base {served_base!r}"
    if not allow_mismatch:
        raise BaseMismatchError(f"{message} (set D2LORA_ALLOW_BASE_MISMATCH=true to accept it)")
    return (message,)


def check_adapter(
    artifact: Path,
    base_shapes: dict[str, tuple[int, ...]],
    served_base: str,
    allow_mismatch: bool,
    limits: ArchiveLimits,
) -> CheckedAdapter:
    """Everything the merger checks before writing, plus the base-name policy."""
    adapter = Adapter.load(artifact, limits)
    bound = adapter.bind(base_shapes)
    warnings = check_base_name(adapter.config.base_model_name_or_path, served_base, allow_mismatch)
    return CheckedAdapter(
        adapter.kind.name, adapter.config.base_model_name_or_path, tuple(m.weight_key for m in bound), warnings
    )


def keep_fused_tensors(merged_dir: Path, weight_keys: tuple[str, ...], out_file: Path) -> None:
    """Copy only the changed tensors of the merged checkpoint into one safetensors file (atomically)."""
    with CheckpointReader(merged_dir) as reader:
        tensors = {key: reader.read(key).contiguous() for key in weight_keys}
    save_atomic(out_file, lambda tmp: save_file(tensors, tmp))


def merge_and_verify(
    base_dir: Path, artifact: Path, work_dir: Path, checked: CheckedAdapter, dtype: str, limits: ArchiveLimits
) -> MergeOutcome:
    """Merge into work_dir, prove it equivalent, and leave work_dir/fused.safetensors."""
    from merger.verify import verify  # imports transformers: only in the worker

    start = time.perf_counter()
    merged_dir = work_dir / MERGED_DIR
    merge(base_dir, artifact, merged_dir, dtype=dtype, progress=False, limits=limits)
    report = verify(base_dir, artifact, merged_dir=merged_dir, dtype=dtype)
    if not report.passed:
        raise EquivalenceError(f"merged and unmerged outputs disagree: {'; '.join(report.failures)}", report.to_dict())
    keep_fused_tensors(merged_dir, checked.weight_keys, work_dir / FUSED_FILE)
    return MergeOutcome(time.perf_counter() - start, report.to_dict(), report.logits.max_abs_logit_diff)
