"""Adapter records on disk: one JSON file and one fused-tensor file per version.

    <data_dir>/adapters/<name>/000001.json          the record of version 1
    <data_dir>/adapters/<name>/000001.safetensors   its fused target tensors (what the scheduler swaps in)
    <data_dir>/adapters/<name>/000001.form/         its per-request form (batched serving; SPEC §1)
    <data_dir>/adapters/<name>/000001.artifact/     the artifact as uploaded, to rebuild derived files from
    <data_dir>/registry.lock                        every live server holds it shared (flock)
    <data_dir>/tmp/<owner>/                         one server's uploads and merges in progress
    <data_dir>/tmp/<owner>.lock                     held exclusively by that server while it lives

Every file is written to a temporary name, fsynced and renamed, so a crash
leaves either the old file or the new one.  The record a client sees is a
name's latest version; the version that serves is its latest *ready* one, so a
replacement in progress (or one that failed) leaves the previous version serving
until the new one is ready.

Several servers (replicas) may share one data dir.  Recovery at start touches
only what dead servers left: a `merging` version whose owner's lock is free
becomes `failed`, and a dead owner's tmp folder is deleted.  Only a server that
finds itself alone (it gets registry.lock exclusively) also deletes files no
record points to and fails `ready` versions whose tensors vanished.  Records
are re-read from disk whenever a name's folder changes (mtime), so replicas
see each other's uploads, replacements and deletions.  flock needs a local
filesystem or one that honours it (NFSv4, CephFS).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from merger.fs import create_exclusive, fsync_dir, write_atomic

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
RECORD_SUFFIX = ".json"
TENSORS_SUFFIX = ".safetensors"
FORM_SUFFIX = ".form"
ARTIFACT_SUFFIX = ".artifact"
INTERRUPTED = "interrupted: the server stopped while this adapter was merging; upload it again"
LOCK_FILE = "registry.lock"
LOCK_SUFFIX = ".lock"
SETTLED_NS = 2_000_000_000  # a folder changed this recently may change again within its mtime's granularity

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
    form_dir: str | None = None  # per-request form folder, absolute path; None: served with merged weights only
    artifact_dir: str | None = None  # the uploaded artifact (config + factors), absolute path
    owner: str | None = None  # the server that merges it (its tmp/<owner>.lock is held while it lives)

    @property
    def stem(self) -> str:
        return f"{self.version:06d}"

    @property
    def fused_tensors(self) -> Path:
        """The fused target tensors of a ready version (what the scheduler swaps in)."""
        if self.tensors_file is None:
            raise ValueError(f"adapter {self.name} v{self.version} has no tensors (status {self.status})")
        return Path(self.tensors_file)

    @property
    def per_request_form(self) -> Path | None:
        """The folder batched serving loads this version from, if it has one."""
        return None if self.form_dir is None else Path(self.form_dir)

    def files(self) -> set[str]:
        """The names, inside its adapter's folder, of everything this version owns on disk."""
        paths = (self.tensors_file, self.form_dir, self.artifact_dir)
        return {f"{self.stem}{RECORD_SUFFIX}"} | {Path(p).name for p in paths if p}


def _lock(path: Path, mode: int) -> int | None:
    """An fd holding flock `mode` on `path` (created if missing), or None if another holder conflicts."""
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)  # read-only: the data dir can still be remounted ro
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def owner_alive(tmp: Path, owner: str | None) -> bool:
    """Whether the server `owner` still holds its lock (a missing lock file: it is gone)."""
    path = tmp / f"{owner}{LOCK_SUFFIX}"
    if owner is None or not path.is_file():
        return False
    fd = _lock(path, fcntl.LOCK_EX)
    if fd is None:
        return True
    os.close(fd)
    return False


class Registry:
    """Every version of every adapter, loaded from and persisted to `data_dir` (shared by replicas)."""

    def __init__(self, data_dir: Path):
        self.root = data_dir / "adapters"
        self.tmp = data_dir / "tmp"
        self.lock_path = data_dir / LOCK_FILE
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.versions: dict[str, dict[int, AdapterRecord]] = {}
        self.seen: dict[str, int] = {}  # name -> mtime_ns of its folder when last read
        self.fds: list[int] = []

    def load(self) -> None:
        """Take the locks, recover what dead servers left, read every record."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        exclusive = _lock(self.lock_path, fcntl.LOCK_EX)
        alone = exclusive is not None
        fd = exclusive if exclusive is not None else os.open(self.lock_path, os.O_RDONLY)
        if not alone:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a server that started alone recovers
        self.fds.append(fd)
        self._remove_dead_owners()
        self._claim_work_dir()
        self.refresh()
        self._fail_interrupted(alone)
        if alone:
            self._remove_strays()
            fcntl.flock(fd, fcntl.LOCK_SH)

    def close(self) -> None:
        """Release the locks (as a crash would; files stay)."""
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def _remove_dead_owners(self) -> None:
        """tmp/ entries of servers that no longer hold their lock (a folder's lock is made before it)."""
        for path in list(self.tmp.iterdir()):
            owner = path.name.removesuffix(LOCK_SUFFIX)
            if not owner_alive(self.tmp, owner):
                _remove(self.tmp / owner)
                (self.tmp / f"{owner}{LOCK_SUFFIX}").unlink(missing_ok=True)

    def _claim_work_dir(self) -> None:
        fd = _lock(self.tmp / f"{self.owner}{LOCK_SUFFIX}", fcntl.LOCK_EX)
        assert fd is not None, "a fresh owner id is never locked"
        self.fds.append(fd)
        (self.tmp / self.owner).mkdir()

    def _fail_interrupted(self, alone: bool) -> None:
        for record in [r for versions in self.versions.values() for r in versions.values()]:
            cut = record.status == "merging" and not owner_alive(self.tmp, record.owner)
            vanished = alone and record.status == "ready" and not self._tensors_exist(record)
            if cut or vanished:
                self.save(record.model_copy(update={"status": "failed", "error": INTERRUPTED, "tensors_file": None}))
                logger.warning("adapter %s v%d: %s", record.name, record.version, INTERRUPTED)
            elif alone and record.form_dir is not None and not Path(record.form_dir).is_dir():
                self.save(record.model_copy(update={"form_dir": None}))  # merged weights still serve it
                logger.warning("adapter %s v%d: its per-request form vanished", record.name, record.version)

    def refresh(self) -> None:
        """Re-read the records of every name whose folder changed on disk (another replica wrote it)."""
        names = {p.name for p in self.root.iterdir() if NAME_PATTERN.match(p.name) and p.is_dir()}
        for gone in set(self.versions) - names:
            self.versions.pop(gone, None)
            self.seen.pop(gone, None)
        for name in names:
            self._refresh_name(name)

    def _refresh_name(self, name: str) -> None:
        try:
            mtime = (self.root / name).stat().st_mtime_ns
        except FileNotFoundError:
            self.versions.pop(name, None)
            return
        if self.seen.get(name) == mtime:
            return
        records = {r.version: r for r in map(_read_record, (self.root / name).glob(f"*{RECORD_SUFFIX}")) if r}
        self.versions[name] = records
        if not records:
            self.versions.pop(name)
        settled = time.time_ns() - mtime > SETTLED_NS
        self.seen[name] = mtime if settled else -1

    @staticmethod
    def _tensors_exist(record: AdapterRecord) -> bool:
        return record.tensors_file is not None and Path(record.tensors_file).is_file()

    def _remove_strays(self) -> None:
        """Anything in adapters/ that no record accounts for (half-written files, removed names)."""
        for folder in self.root.iterdir():
            kept = {name for r in self.versions.get(folder.name, {}).values() for name in r.files()}
            if not folder.is_dir() or not kept:
                _remove(folder)
                continue
            for path in folder.iterdir():
                if path.name not in kept:
                    _remove(path)

    # queries

    def latest(self, name: str) -> AdapterRecord | None:
        if NAME_PATTERN.match(name):
            self._refresh_name(name)
        versions = self.versions.get(name)
        return versions[max(versions)] if versions else None

    def serving(self, name: str) -> AdapterRecord | None:
        if NAME_PATTERN.match(name):
            self._refresh_name(name)
        ready = [r for r in self.versions.get(name, {}).values() if r.status == "ready"]
        return max(ready, key=lambda r: r.version) if ready else None

    def all_latest(self) -> list[AdapterRecord]:
        self.refresh()
        return [record for name in sorted(self.versions) if (record := self.latest(name)) is not None]

    def all_serving(self) -> list[AdapterRecord]:
        self.refresh()
        return [r for r in (self.serving(name) for name in sorted(self.versions)) if r is not None]

    # changes

    def new_version(self, name: str, **fields) -> AdapterRecord:
        """A `merging` record for the next version of `name`, persisted (a version a replica took is skipped)."""
        self._refresh_name(name)
        version = max(self.versions.get(name, {0: None})) + 1
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            record = AdapterRecord(name=name, version=version, status="merging", owner=self.owner, **fields)
            if create_exclusive(folder / f"{record.stem}{RECORD_SUFFIX}", record.model_dump_json(indent=2).encode()):
                self.versions.setdefault(name, {})[version] = record
                return record
            version += 1

    def tensors_path(self, record: AdapterRecord) -> Path:
        return self.root / record.name / f"{record.stem}{TENSORS_SUFFIX}"

    def form_path(self, record: AdapterRecord) -> Path:
        return self.root / record.name / f"{record.stem}{FORM_SUFFIX}"

    def artifact_path(self, record: AdapterRecord) -> Path:
        return self.root / record.name / f"{record.stem}{ARTIFACT_SUFFIX}"

    def save(self, record: AdapterRecord) -> None:
        folder = self.root / record.name
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / f"{record.stem}{RECORD_SUFFIX}", record.model_dump_json(indent=2))
        self.versions.setdefault(record.name, {})[record.version] = record

    def discard(self, record: AdapterRecord) -> None:
        """Forget one version (a failed synchronous upload): the registry is as it was before it."""
        self.versions.get(record.name, {}).pop(record.version, None)
        self.discard_files(record)
        (self.root / record.name / f"{record.stem}{RECORD_SUFFIX}").unlink(missing_ok=True)
        if self.latest(record.name) is None:
            self.delete(record.name)

    def discard_files(self, record: AdapterRecord) -> None:
        """Remove what a version owns beside its record: fused tensors, per-request form, artifact."""
        for path in (self.tensors_path(record), self.form_path(record), self.artifact_path(record)):
            _remove(path)

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
            doomed = self.tmp / self.owner / f"deleted-{name}-{uuid.uuid4().hex}"
            os.rename(folder, doomed)
            fsync_dir(self.root)
            shutil.rmtree(doomed, ignore_errors=True)

    def work_dir(self) -> Path:
        """A fresh folder under tmp/ for one upload and its merge."""
        folder = self.tmp / self.owner / uuid.uuid4().hex
        folder.mkdir()
        return folder


def _read_record(path: Path) -> AdapterRecord | None:
    """A record file, or None if it vanished since it was listed (another replica pruned it)."""
    try:
        return AdapterRecord.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
