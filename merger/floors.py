"""What a dtype alone costs a base model (the "dtype floor" of merger.report), kept on disk.

The floor depends on the base's weights, the dtype and the probes, never on an adapter, so it is
computed once and reused by every later verification against that base and dtype.  One JSON file
per key, written atomically (merger.fs): servers sharing a folder may compute the same floor at the
same time, and each reader sees one writer's complete file.  A file that cannot be read is treated
as missing (computed again and overwritten).

The key hashes what identifies the base without reading its weights (every shard's header, size and
modification time: a copied or edited checkpoint gets a new key), the dtype, the probe tokens and
FLOOR_FORMAT.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from merger.checkpoint import INDEX_NAME, read_header, shard_files
from merger.dtypes import dtype_name
from merger.fs import write_atomic
from merger.probes import NEW_TOKENS, ProbeBatch
from merger.report import LogitMetrics

FLOOR_FORMAT = 2  # bump when the floor is computed differently


def floor_key(base_dir: Path, dtype: torch.dtype, probes: ProbeBatch) -> str:
    digest = hashlib.sha256(f"d2lora-floor-{FLOOR_FORMAT}|{dtype_name(dtype)}|{NEW_TOKENS}|".encode())
    digest.update(probes.input_ids.numpy().tobytes() + probes.attention_mask.numpy().tobytes())
    index = base_dir / INDEX_NAME
    for shard in sorted(shard_files(base_dir), key=lambda p: p.name):
        stat = shard.stat()
        header, _ = read_header(shard)
        digest.update(f"|{shard.name}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
        digest.update(json.dumps(header, sort_keys=True).encode())
    if index.is_file():
        digest.update(index.read_bytes())
    return digest.hexdigest()


class FloorCache:
    """dtype floors in `folder`, one `<key>.json` each."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> LogitMetrics | None:
        try:
            fields = json.loads(self.path(key).read_text())["floor"]
            fields["greedy_first_divergence"] = tuple(fields["greedy_first_divergence"])
            return LogitMetrics(**fields)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, base_dir: Path, dtype: torch.dtype, floor: LogitMetrics) -> None:
        record = {"base": str(base_dir), "dtype": dtype_name(dtype), "floor": dataclasses.asdict(floor)}
        write_atomic(self.path(key), json.dumps(record, indent=2) + "\n")
