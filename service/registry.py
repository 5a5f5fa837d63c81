"""Adapter records on disk: one JSON file and one fused-tensor file per version.

    <data_dir>/adapters/<name>/000001.json          the record of version 1
    <data_dir>/adapters/<name>/000001.safetensors   its fused target tensors (what the scheduler swaps in)
    <data_dir>/tmp/                                 uploads and merges in progress; emptied at start

Every file is written to a temporary name, fsynced and renamed, so a crash
leaves either the old file or the new one.  The record a client sees is a
name's latest version; the version that serves is its latest *ready* one, so a
replacement in progress (or one that failed) leaves the previous version serving
until the new one is ready.  At start, a version left `merging` by a crash
becomes `failed`; files no record points to are deleted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
RECORD_SUFFIX = ".json"
TENSORS_SUFFIX = ".safetensors"
INTERRUPTED = "interrupted: the server stopped while this adapter was merging; upload it again"

Status = Literal["merging", "ready", "failed"]


class AdapterRecord(BaseModel):
    name: str
    version: int
    status: Status
    kind: str | None = None  # "D2LORA" | "LORA" | "DORA"
    base_model: str  # the served base this version is fused into
    adapter_base_model: str | None = None  # base_model_name_or_path from the adapter's config
    created_at: int = Field(default_factory=lambda: int(time.time()))
    merge_seconds: float | None = None
    equivalence: dict | None = None  # merger.verify's EquivalenceReport.to_dict()
    error: str | None = None
    warnings: list[str] = Field(default_factory=list)
    tensors_file: str | None = None  # fused target tensors, absolute path; set when ready

    @property
    def stem(self) -> str:
        return f"{self.version:06d}"


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a sibling temp file, fsync, rename over `path`, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Registry:
    """Every version of every adapter, loaded from and persisted to `data_dir`."""

    def __init__(self, data_dir: Path):
        self.root = data_dir / "adapters"
        self.tmp = data_dir / "tmp"
        self.versions: dict[str, dict[int, AdapterRecord]] = {}

    def load(self) -> None:
        """Read every record; fail interrupted merges; remove temp and orphan files."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and NAME_PATTERN.match(p.name)):
            self._load_adapter(folder)
        self._remove_strays()

    def _load_adapter(self, folder: Path) -> None:
        for path in sorted(folder.glob(f"*{RECORD_SUFFIX}")):
            record = AdapterRecord.model_validate_json(path.read_bytes())
            if record.status == "merging" or (record.status == "ready" and not self._tensors_exist(record)):
                record = record.model_copy(update={"status": "failed", "error": INTERRUPTED, "tensors_file": None})
                self.save(record)
                logger.warning("adapter %s v%d: %s", record.name, record.version, INTERRUPTED)
            self.versions.setdefault(record.name, {})[record.version] = record

    @staticmethod
    def _tensors_exist(record: AdapterRecord) -> bool:
        return record.tensors_file is not None and Path(record.tensors_file).is_file()

    def _remove_strays(self) -> None:
        """Anything in adapters/ that no record accounts for (half-written files, removed names)."""
        for folder in self.root.iterdir():
            kept = {f"{r.stem}{RECORD_SUFFIX}" for r in self.versions.get(folder.name, {}).values()}
            kept |= {Path(r.tensors_file).name for r in self.versions.get(folder.name, {}).values() if r.tensors_file}
            if not folder.is_dir() or not kept:
                _remove(folder)
                continue
            for path in folder.iterdir():
                if path.name not in kept:
                    _remove(path)

    # queries

    def latest(self, name: str) -> AdapterRecord | None:
        versions = self.versions.get(name)
        return versions[max(versions)] if versions else None

    def serving(self, name: str) -> AdapterRecord | None:
        ready = [r for r in self.versions.get(name, {}).values() if r.status == "ready"]
        return max(ready, key=lambda r: r.version) if ready else None

    def all_latest(self) -> list[AdapterRecord]:
        return [self.latest(name) for name in sorted(self.versions)]

    def all_serving(self) -> list[AdapterRecord]:
        return [r for r in (self.serving(name) for name in sorted(self.versions)) if r is not None]

    # changes

    def new_version(self, name: str, **fields) -> AdapterRecord:
        """A `merging` record for the next version of `name`, persisted."""
        version = max(self.versions.get(name, {0: None})) + 1
        record = AdapterRecord(name=name, version=version, status="merging", **fields)
        self.save(record)
        return record

    def tensors_path(self, record: AdapterRecord) -> Path:
        return self.root / record.name / f"{record.stem}{TENSORS_SUFFIX}"

    def save(self, record: AdapterRecord) -> None:
        folder = self.root / record.name
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"{record.stem}{RECORD_SUFFIX}", record.model_dump_json(indent=2).encode())
        self.versions.setdefault(record.name, {})[record.version] = record

    def discard(self, record: AdapterRecord) -> None:
        """Forget one version (a failed synchronous upload): the registry is as it was before it."""
        self.versions[record.name].pop(record.version, None)
        for path in (self.root / record.name / f"{record.stem}{RECORD_SUFFIX}", self.tensors_path(record)):
            path.unlink(missing_ok=True)
        if not self.versions[record.name]:
            self.delete(record.name)

    def prune(self, name: str) -> None:
        """Drop every version older than the serving one (called once the new one is swapped in)."""
        serving = self.serving(name)
        for record in [r for r in self.versions.get(name, {}).values() if serving and r.version < serving.version]:
            self.discard(record)

    def delete(self, name: str) -> None:
        """Remove a name and all its versions: renamed away first, so it vanishes at once."""
        self.versions.pop(name, None)
        folder = self.root / name
        if folder.exists():
            doomed = self.tmp / f"deleted-{name}-{uuid.uuid4().hex}"
            os.rename(folder, doomed)
            fsync_dir(self.root)
            shutil.rmtree(doomed, ignore_errors=True)

    def work_dir(self) -> Path:
        """A fresh folder under tmp/ for one upload and its merge."""
        folder = self.tmp / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
