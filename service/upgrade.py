"""Records of older versions brought up to date when a server starts.

A ready version that kept its uploaded artifact but has no per-request form (written before batched
serving, or its form folder was lost) gets its form built again from the artifact and the base
(merger.per_request), so it is batched like a new upload.  A version with neither cannot be upgraded
(the dense fused tensors do not give back the factors): it is served with merged weights, and the log
says to upload it again.  Replicas sharing the data dir may upgrade the same version at once: the first
folder moved into place wins and the others use it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from merger.archive import CONFIG_NAME, ArchiveLimits
from merger.errors import D2LoraError
from merger.per_request import write_per_request_form
from service.registry import AdapterRecord, Registry

logger = logging.getLogger(__name__)


def kept_artifact(record: AdapterRecord) -> Path | None:
    """What merger.artifact reads from the version's artifact folder: the folder itself, or its one archive."""
    folder = None if record.artifact_dir is None else Path(record.artifact_dir)
    if folder is None or not folder.is_dir():
        return None
    if (folder / CONFIG_NAME).is_file():
        return folder
    members = list(folder.iterdir())
    return members[0] if len(members) == 1 else None


def upgrade_form(registry: Registry, record: AdapterRecord, base_dir: Path, limits: ArchiveLimits) -> AdapterRecord:
    """The record with a per-request form built from its kept artifact (unchanged when it has none)."""
    artifact = kept_artifact(record)
    if artifact is None:
        logger.warning("adapter %s v%d has no per-request form and no kept artifact (uploaded by an older "
                       "release): served with merged weights only; upload it again to batch it",
                       record.name, record.version)  # fmt: skip
        return record
    form_dir, work_dir = registry.form_path(record), registry.work_dir()
    try:
        write_per_request_form(base_dir, artifact, work_dir / "form", limits=limits)
        try:
            os.replace(work_dir / "form", form_dir)
        except OSError:
            if not form_dir.is_dir():  # not another replica's form moved in first: a real failure
                raise
    except (D2LoraError, OSError) as err:
        logger.warning("adapter %s v%d: its per-request form could not be built (%s): served with merged "
                       "weights only", record.name, record.version, err)  # fmt: skip
        return record
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    upgraded = record.model_copy(update={"form_dir": str(form_dir)})
    registry.save(upgraded)
    logger.info("adapter %s v%d: per-request form built from its kept artifact", record.name, record.version)
    return upgraded


def upgrade_records(registry: Registry, base_dir: Path, limits: ArchiveLimits) -> None:
    """Give every serving version without a per-request form one, where its artifact allows."""
    for record in registry.all_serving():
        if record.form_dir is None:
            upgrade_form(registry, record, base_dir, limits)
