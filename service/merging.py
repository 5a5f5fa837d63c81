"""The blocking part of an upload: a short sequence of named stages, each logged on one line with its seconds.

    validate  the artifact against the served base (management runs it before any record exists)
    fuse      the adapter fused into the base tensors it targets, written alone to work_dir/fused.safetensors,
              and its per-request form from the same row scales, work_dir/form/ (merger.per_request:
              batched serving, SPEC §1)
    verify    that file over the base against the unmerged adapter (merger.verify, a layer at a time)
    keep      the file, the form and the artifact moved into the registry, the model added to the scheduler
              (management, on the event loop)

WORKER_STAGES are the ones a worker thread runs, in order: adding a stage is adding a line there.
A stage reads and writes the UploadWork the stages share; nothing here touches the registry or the
event loop, and a failed stage leaves nothing half-written (every file goes through merger.fs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors.torch import save_file

from merger.archive import ArchiveLimits
from merger.artifact import Adapter
from merger.checkpoint import CheckpointReader
from merger.errors import D2LoraError
from merger.floors import FloorCache
from merger.fs import save_atomic
from merger.merge import fuse_into_file
from merger.per_request import PerRequestForm

logger = logging.getLogger(__name__)

FUSED_FILE = "fused.safetensors"
FORM_DIR = "form"
FLOORS_DIR = "dtype_floors"  # under the data dir: merger.floors.FloorCache, shared by replicas


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
    """Copy only the changed tensors of a merged checkpoint into one safetensors file (atomically)."""
    with CheckpointReader(merged_dir) as reader:
        tensors = {key: reader.read(key).contiguous() for key in weight_keys}
    save_atomic(out_file, lambda tmp: save_file(tensors, tmp))


@dataclasses.dataclass
class UploadWork:
    """What the worker's stages share: the upload, and what each stage leaves for the next."""

    base_dir: Path
    artifact: Path
    work_dir: Path  # the upload's own folder; the fused file is left here
    checked: CheckedAdapter
    dtype: str  # the fused tensors' dtype (Settings.merge_dtype)
    limits: ArchiveLimits
    floors: FloorCache | None  # where dtype floors are kept (None: computed every time)
    label: str  # "adapter NAME vN", for the log lines
    equivalence: dict | None = None  # EquivalenceReport.to_dict(), once verified
    max_abs_logit_diff: float | None = None

    @property
    def fused_file(self) -> Path:
        return self.work_dir / FUSED_FILE

    @property
    def form_dir(self) -> Path:
        return self.work_dir / FORM_DIR


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[UploadWork], None]


def fuse(work: UploadWork) -> None:
    """The fused tensors and the per-request form, each module's row scale computed once for both."""
    form = PerRequestForm()
    fuse_into_file(work.base_dir, work.artifact, work.fused_file, dtype=work.dtype, limits=work.limits,
                   on_form=form.add)  # fmt: skip
    form.write(work.form_dir, Adapter.load(work.artifact, work.limits))


def verify_fused(work: UploadWork) -> None:
    from merger.verify import verify  # imports transformers: only in the worker

    report = verify(work.base_dir, work.artifact, fused=work.fused_file, dtype=work.dtype, limits=work.limits,
                    floor_cache=work.floors, progress=False)  # fmt: skip
    if not report.passed:
        raise EquivalenceError(f"merged and unmerged outputs disagree: {'; '.join(report.failures)}", report.to_dict())
    work.equivalence, work.max_abs_logit_diff = report.to_dict(), report.logits.max_abs_logit_diff


WORKER_STAGES: tuple[Stage, ...] = (
    Stage("fuse", fuse),
    Stage("verify", verify_fused),
)


@contextlib.contextmanager
def logged_stage(label: str, stage: str) -> Iterator[None]:
    """One log line for one stage: its name and seconds (and whether it failed)."""
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        logger.info("%s: %s failed after %.2f s", label, stage, time.perf_counter() - start)
        raise
    logger.info("%s: %s %.2f s", label, stage, time.perf_counter() - start)


def run_stages(work: UploadWork, stages: tuple[Stage, ...] = WORKER_STAGES) -> MergeOutcome:
    """Every stage in order, in this thread; the outcome once verified, with the fused file and form left."""
    start = time.perf_counter()
    for stage in stages:
        with logged_stage(work.label, stage.name):
            stage.run(work)
    if work.equivalence is None or work.max_abs_logit_diff is None:
        raise RuntimeError(f"{work.label}: the stages {[s.name for s in stages]} never verified the fused tensors")
    return MergeOutcome(time.perf_counter() - start, work.equivalence, work.max_abs_logit_diff)
