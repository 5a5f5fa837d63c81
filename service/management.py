"""Adapter uploads from request to registry: receive → validate → fuse → verify (one at a time) → keep.

The stages are service.merging's, each logged on one line with its seconds.

Validation runs before any record exists, so a bad upload leaves the registry
as it was.  The merge runs on a single worker thread (merges are serialised,
the event loop never blocks).  A version becomes the one that serves only when
its fused tensors are in place; the scheduler is told, then older versions are
pruned.  A synchronous upload (`wait=true`) that fails is discarded whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import Request

from merger.archive import CONFIG_NAME, WEIGHTS_NAME, ArchiveLimits
from merger.checkpoint import checkpoint_shapes
from merger.errors import D2LoraError
from merger.floors import FloorCache
from service import metrics
from service.errors import storage_error
from service.merging import (
    FLOORS_DIR,
    CheckedAdapter,
    EquivalenceError,
    MergeOutcome,
    UploadWork,
    check_adapter,
    logged_stage,
    run_stages,
)
from service.protocol import APIError
from service.registry import NAME_PATTERN, AdapterRecord, Registry
from service.settings import Settings
from service.uploads import receive_upload

logger = logging.getLogger(__name__)

FILE_FIELDS = frozenset({"config", "weights", "archive"})
TEXT_FIELDS = frozenset({"name"})
ARTIFACT_DIR = "artifact"
ARCHIVE_EXPANSION = 4  # safetensors weights barely compress: a bigger ratio is a decompression bomb


def check_name(name: str | None) -> str:
    if not name:
        raise APIError(400, "form field 'name' is required", param="name", code="missing_name")
    if not NAME_PATTERN.match(name):
        raise APIError(400, f"name {name!r} must match {NAME_PATTERN.pattern}", param="name", code="invalid_name")
    return name


def assemble_artifact(files: dict[str, Path], work_dir: Path) -> Path:
    """The uploaded files as something merger.artifact reads: an archive, or a folder of the two files."""
    if set(files) == {"archive"}:
        return files["archive"]
    if set(files) == {"config", "weights"}:
        folder = work_dir / ARTIFACT_DIR
        folder.mkdir()
        os.rename(files["config"], folder / CONFIG_NAME)
        os.rename(files["weights"], folder / WEIGHTS_NAME)
        return folder
    raise APIError(
        400, "send either files 'config' and 'weights', or one file 'archive'", param="archive", code="missing_files"
    )


def upload_limits(settings: Settings) -> ArchiveLimits:
    """What an uploaded archive may unpack to, all members together."""
    unpacked = settings.max_upload_bytes * ARCHIVE_EXPANSION
    return ArchiveLimits(max_member_bytes=unpacked, max_total_bytes=unpacked)


class AdapterManager:
    def __init__(self, settings: Settings, base_dir: Path, base_name: str, registry: Registry, scheduler):
        self.settings, self.base_dir, self.base_name = settings, base_dir, base_name
        self.registry, self.scheduler = registry, scheduler
        self.limits = upload_limits(settings)
        self.base_shapes = checkpoint_shapes(base_dir)
        self.floors = FloorCache(settings.data_dir / FLOORS_DIR)  # dtype floors: once per base and dtype
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="d2lora-merge")
        self.merging: set[str] = set()
        self.failure_status: dict[str, int] = {}  # name -> HTTP status of its last failed merge (one at a time)
        self.jobs: set[asyncio.Task] = set()

    async def upload(self, request: Request, wait: bool, replace: bool) -> AdapterRecord:
        work_dir = self.registry.work_dir()
        try:
            upload = await receive_upload(request, work_dir, FILE_FIELDS, TEXT_FIELDS, self.settings.max_upload_bytes)
            name = check_name(upload.fields.get("name"))
            self._check_free(name, replace)
            artifact = assemble_artifact(upload.files, work_dir)
            with logged_stage(f"adapter {name}", "validate"):
                checked = await asyncio.to_thread(self._check, artifact)
            self._check_free(name, replace)  # another upload may have taken the name meanwhile
        except BaseException:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise
        return await self._start(name, artifact, work_dir, checked, wait)

    def _check_free(self, name: str, replace: bool) -> None:
        if name == self.base_name.lower():
            raise APIError(409, f"{name!r} is the base model's name", param="name", code="name_taken")
        if name in self.merging:
            raise APIError(
                409,
                f"adapter {name!r} is being merged; try again when it is done",
                param="name",
                code="merge_in_progress",
            )
        if self.registry.latest(name) is not None and not replace:
            raise APIError(
                409,
                f"adapter {name!r} exists; DELETE it or POST with ?replace=true",
                param="name",
                code="adapter_exists",
            )

    def _check(self, artifact: Path) -> CheckedAdapter:
        try:
            return check_adapter(
                artifact, self.base_shapes, self.base_name, self.settings.allow_base_mismatch, self.limits
            )
        except D2LoraError as err:
            raise APIError(422, str(err), param="adapter", code="invalid_adapter") from None

    async def _start(
        self, name: str, artifact: Path, work_dir: Path, checked: CheckedAdapter, wait: bool
    ) -> AdapterRecord:
        record = self.registry.new_version(
            name,
            kind=checked.kind,
            base_model=self.base_name,
            adapter_base_model=checked.base_model,
            warnings=list(checked.warnings),
        )
        self.merging.add(name)
        self.failure_status.pop(name, None)
        job = asyncio.create_task(self._merge(record, artifact, work_dir, checked))
        self.jobs.add(job)
        job.add_done_callback(self.jobs.discard)
        if not wait:
            return record
        done = await asyncio.shield(job)  # a client that gives up does not stop the merge
        if done.status == "failed":
            self.registry.discard(done)
            status = self.failure_status.pop(name, 422)
            code = "insufficient_storage" if status == 507 else "merge_failed"
            raise APIError(status, done.error or "merge failed", param="adapter", code=code)
        return done

    async def _merge(
        self, record: AdapterRecord, artifact: Path, work_dir: Path, checked: CheckedAdapter
    ) -> AdapterRecord:
        loop = asyncio.get_running_loop()
        label = f"adapter {record.name} v{record.version}"
        work = UploadWork(
            self.base_dir, artifact, work_dir, checked, self.settings.merge_dtype, self.limits, self.floors, label
        )
        try:
            outcome = await loop.run_in_executor(self.worker, run_stages, work)
            with logged_stage(label, "keep"):
                return await self._ready(record, work, outcome)
        except EquivalenceError as err:
            return self._failed(record, str(err), err.report)
        except Exception as err:
            return self._merge_error(record, err)
        finally:
            self.merging.discard(record.name)
            shutil.rmtree(work_dir, ignore_errors=True)

    def _merge_error(self, record: AdapterRecord, err: Exception) -> AdapterRecord:
        """A full or read-only data dir (507), the adapter's fault (422), or a crash (logged)."""
        if (failure := storage_error(err)) is not None:
            return self._failed(record, failure.message, status=507)
        if isinstance(err, D2LoraError):
            return self._failed(record, str(err))
        logger.exception("adapter %s v%d: merge crashed", record.name, record.version, exc_info=err)
        return self._failed(record, f"internal error while merging: {err}")

    async def _ready(self, record: AdapterRecord, work: UploadWork, outcome: MergeOutcome) -> AdapterRecord:
        tensors_file, form_dir = self.registry.tensors_path(record), self.registry.form_path(record)
        artifact_dir = self.registry.artifact_path(record)
        os.replace(work.fused_file, tensors_file)
        os.replace(work.form_dir, form_dir)
        keep_artifact(work.artifact, artifact_dir)
        ready = record.model_copy(
            update={
                "status": "ready",
                "merge_seconds": round(outcome.seconds, 3),
                "equivalence": outcome.equivalence,
                "tensors_file": str(tensors_file),
                "form_dir": str(form_dir),
                "artifact_dir": str(artifact_dir),
            }
        )
        await self.scheduler.add_model(ready.name, tensors_file, form_dir)  # old requests finish on the old weights
        self.registry.save(ready)
        self.registry.prune(ready.name)
        metrics.MERGES.labels(status="ok").inc()
        metrics.MERGE_SECONDS.observe(outcome.seconds)
        metrics.EQUIVALENCE_MAX_ABS_LOGIT_DIFF.labels(model=ready.name).set(outcome.max_abs_logit_diff)
        return ready

    def _failed(
        self, record: AdapterRecord, error: str, equivalence: dict | None = None, status: int = 422
    ) -> AdapterRecord:
        self.failure_status[record.name] = status
        self.registry.discard_files(record)
        failed = record.model_copy(update={"status": "failed", "error": error, "equivalence": equivalence})
        self.registry.save(failed)
        metrics.MERGES.labels(status="failed").inc()
        logger.warning("adapter %s v%d failed: %s", record.name, record.version, error)
        return failed

    async def delete(self, name: str) -> None:
        if self.registry.latest(name) is None:
            raise APIError(404, f"adapter {name!r} does not exist", param="name", code="adapter_not_found")
        if name in self.merging:
            raise APIError(
                409,
                f"adapter {name!r} is being merged; delete it when that is done",
                param="name",
                code="merge_in_progress",
            )
        await self.scheduler.remove_model(name)
        self.registry.delete(name)
        forget_equivalence(name)

    async def close(self) -> None:
        for job in list(self.jobs):
            job.cancel()
        self.worker.shutdown(wait=False, cancel_futures=True)


def keep_artifact(artifact: Path, artifact_dir: Path) -> None:
    """The uploaded artifact (a folder of the two files, or one archive) as the version's artifact folder."""
    if artifact.is_dir():
        os.replace(artifact, artifact_dir)
        return
    artifact_dir.mkdir()
    os.replace(artifact, artifact_dir / artifact.name)


def forget_equivalence(name: str) -> None:
    with contextlib.suppress(KeyError):  # never became ready in this process
        metrics.EQUIVALENCE_MAX_ABS_LOGIT_DIFF.remove(name)
