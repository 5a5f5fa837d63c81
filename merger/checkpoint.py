"""Sharded safetensors checkpoints: a lazy reader and a size-capped writer.

Neither loads a whole shard.  The reader parses each shard's JSON header and
reads one tensor's bytes at a time (one shard file open at once), or maps just
one tensor's bytes (MappedTensor: zero-copy, its pages dropped on request); the writer
lays out every shard's header up front, so tensors are streamed into place one
by one and untouched tensors are copied file-to-file by the kernel
(`copy_file_range`) without passing through Python memory.  Peak memory is one
tensor, not one shard, whatever the model size.  Knows nothing of adapters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Self

import torch

from merger.dtypes import SAFETENSORS_DTYPES, SAFETENSORS_NAMES
from merger.errors import D2LoraError
from merger.fs import PICKLE_WEIGHTS, write_atomic

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(D2LoraError):
    """The base checkpoint is missing, unreadable or not safetensors."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SAFETENSORS_DTYPES[self.dtype].itemsize


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    spec: TensorSpec
    file: Path
    offset: int  # absolute byte offset of the data in the file


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where data begins."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{path.name}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100 << 20 or length > path.stat().st_size:
            raise CheckpointError(f"{path.name}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path.name}: not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: not a safetensors file (header is not an object)")
    return header, 8 + length


def _is_index_list(value, length: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and (length is None or len(value) == length)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


def _stored_tensor(path: Path, name: str, info, data_start: int, file_size: int) -> StoredTensor:
    """One header entry, checked: known dtype, offsets that match the shape and lie inside the file."""
    if (
        not isinstance(info, dict)
        or not _is_index_list(info.get("shape"))
        or not _is_index_list(info.get("data_offsets"), 2)
    ):
        raise CheckpointError(f"{path.name}: tensor {name!r} has a malformed header entry")
    if info.get("dtype") not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path.name}: tensor {name!r} has unsupported dtype {info.get('dtype')}")
    spec = TensorSpec(name, info["dtype"], tuple(info["shape"]))
    start, end = info["data_offsets"]
    if end - start != spec.nbytes:
        raise CheckpointError(f"{path.name}: tensor {name!r} has {end - start} bytes for shape {list(spec.shape)}")
    if data_start + end > file_size:
        raise CheckpointError(f"{path.name}: tensor {name!r} runs beyond the end of the file (truncated?)")
    return StoredTensor(spec, path, data_start + start)


def _stored_tensors(path: Path) -> list[StoredTensor]:
    header, data_start = read_header(path)
    header.pop("__metadata__", None)
    size = path.stat().st_size
    tensors = [_stored_tensor(path, name, info, data_start, size) for name, info in header.items()]
    return sorted(tensors, key=lambda t: t.offset)


def file_tensors(path: str | Path) -> dict[str, StoredTensor]:
    """Name -> where it is stored, for every tensor of one safetensors file (header only)."""
    return {t.spec.name: t for t in _stored_tensors(Path(path))}


class MappedTensor:
    """One stored tensor as a zero-copy view of a private memory map of just its bytes.

    Only the pages a computation touches become resident; `drop_pages` gives them back (the next
    touch faults them in again from the page cache), and dropping every reference unmaps it, so
    a layer's worth of these costs one layer of address space while it lives.  A tensor whose
    offset does not fit its element size is copied instead (unaligned views are not safe for
    every kernel).
    """

    def __init__(self, stored: StoredTensor):
        self.stored = stored
        spec, dtype = stored.spec, SAFETENSORS_DTYPES[stored.spec.dtype]
        self._map: mmap.mmap | None = None
        self._skip = 0  # bytes between the map's page-aligned start and the tensor
        if spec.nbytes == 0 or stored.offset % dtype.itemsize:
            self.view = _read_stored(stored)
            return
        start = stored.offset - stored.offset % mmap.ALLOCATIONGRANULARITY
        with open(stored.file, "rb") as handle:  # the map keeps its own reference to the file
            length = stored.offset - start + spec.nbytes
            self._map = mmap.mmap(handle.fileno(), length, access=mmap.ACCESS_COPY, offset=start)  # never written back
        self._skip = stored.offset - start
        count = math.prod(spec.shape)
        self.view = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self._skip).view(spec.shape)

    def drop_pages(self, first_byte: int = 0, end_byte: int | None = None) -> None:
        """Give back the resident pages of the tensor's bytes [first_byte, end_byte) (whole pages around them)."""
        if self._map is None:
            return
        page = mmap.PAGESIZE
        start = (self._skip + first_byte) // page * page
        end = min(len(self._map), self._skip + (self.stored.spec.nbytes if end_byte is None else end_byte))
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def drop_rows(self, rows: slice) -> None:
        """Give back the resident pages of the leading-dimension rows `rows` (a weight's output rows)."""
        row_bytes = math.prod(self.stored.spec.shape[1:]) * self.view.element_size()
        self.drop_pages(rows.start * row_bytes, rows.stop * row_bytes)


def _read_stored(stored: StoredTensor) -> torch.Tensor:
    """One tensor copied into fresh memory (see CheckpointReader.read)."""
    dtype = SAFETENSORS_DTYPES[stored.spec.dtype]
    if stored.spec.nbytes == 0:
        return torch.empty(stored.spec.shape, dtype=dtype)
    data = bytearray(stored.spec.nbytes)
    with open(stored.file, "rb") as handle:
        handle.seek(stored.offset)
        if handle.readinto(data) != len(data):
            raise CheckpointError(f"{stored.file.name}: truncated at tensor {stored.spec.name!r}")
    return torch.frombuffer(data, dtype=dtype).reshape(stored.spec.shape)


def mapped_tensors(path: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Zero-copy views of the named tensors of one safetensors file, through a private memory map.

    Nothing is read until a view is touched, and then straight from the page cache, so copying
    a view into an existing tensor costs one copy.  The views keep the mapping alive.
    """
    stored = {t.spec.name: t for t in _stored_tensors(Path(path))}
    with open(path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)  # writable view, never written back
    return {name: _view(mapping, stored[name]) for name in names}


def _view(mapping: mmap.mmap, tensor: StoredTensor) -> torch.Tensor:
    dtype = SAFETENSORS_DTYPES[tensor.spec.dtype]
    count = math.prod(tensor.spec.shape)
    if count == 0:
        return torch.empty(tensor.spec.shape, dtype=dtype)
    return torch.frombuffer(mapping, dtype=dtype, count=count, offset=tensor.offset).view(tensor.spec.shape)


def _index_shards(index: Path) -> list[str]:
    """The shard file names an index lists, in order of first mention."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{index.name}: not a valid index (a JSON object with a weight_map)") from None
    bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
    if bad:
        raise CheckpointError(f"{index.name}: shard name {bad[0]!r} is not a file name in the model folder")
    return names


def shard_files(base_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, in index order."""
    index = base_dir / INDEX_NAME
    if index.is_file():
        return [base_dir / name for name in _index_shards(index)]
    if (base_dir / SINGLE_NAME).is_file():
        return [base_dir / SINGLE_NAME]
    if any((base_dir / name).exists() for name in PICKLE_WEIGHTS):
        raise CheckpointError(f"{base_dir}: only pickle weights found; safetensors are required")
    raise CheckpointError(f"{base_dir}: no {SINGLE_NAME} or {INDEX_NAME}")


class CheckpointReader:
    """Tensor metadata of a whole checkpoint; tensor bytes read on demand.

    A context manager: `with CheckpointReader(folder) as reader: ...` closes the one open shard.
    """

    def __init__(self, base_dir: str | Path):
        self.base_dir = Path(base_dir)
        if not self.base_dir.is_dir():
            raise CheckpointError(f"{self.base_dir}: no such folder")
        self.tensors: dict[str, StoredTensor] = {}
        for shard in shard_files(self.base_dir):
            if not shard.is_file():
                raise CheckpointError(f"{shard.name}: listed in the index but missing")
            self.tensors.update({t.spec.name: t for t in _stored_tensors(shard)})
        self._open: tuple[Path, int] | None = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: t.spec.shape for name, t in self.tensors.items()}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fd(self, path: Path) -> int:
        """The one open shard; opening another closes it."""
        if self._open is None or self._open[0] != path:
            self.close()
            self._open = (path, os.open(path, os.O_RDONLY))
        return self._open[1]

    def read(self, name: str) -> torch.Tensor:
        """One tensor, copied into fresh memory in its stored dtype."""
        stored = self.tensors[name]
        data = bytearray(stored.spec.nbytes)
        view, fd, done = memoryview(data), self._fd(stored.file), 0
        while done < len(data):
            n = os.preadv(fd, [view[done:]], stored.offset + done)
            if n == 0:
                raise CheckpointError(f"{stored.file.name}: truncated at tensor {name!r}")
            done += n
        dtype = SAFETENSORS_DTYPES[stored.spec.dtype]
        if not data:
            return torch.empty(stored.spec.shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(stored.spec.shape)

    def copy_into(self, name: str, dst_fd: int) -> None:
        """Append one tensor's stored bytes to dst_fd, file to file."""
        stored = self.tensors[name]
        _copy_range(self._fd(stored.file), stored.offset, dst_fd, stored.spec.nbytes)

    def close(self) -> None:
        if self._open is not None:
            os.close(self._open[1])
            self._open = None


def layer_of(name: str) -> str:
    """The numbered block a tensor belongs to ('model.layers.3.mlp.up_proj.weight' -> 'model.layers.3'), or ''."""
    parts = name.split(".")
    numbered = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
    return "" if numbered is None else ".".join(parts[: numbered + 1])


def checkpoint_shapes(base_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a checkpoint, from its shard headers alone."""
    with CheckpointReader(base_dir) as reader:
        return reader.shapes()


def _copy_range(src_fd: int, src_offset: int, dst_fd: int, count: int) -> None:
    while count > 0:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(count, 1 << 30), src_offset)
        except OSError:  # e.g. across file systems on old kernels: fall back to read/write
            n = os.write(dst_fd, os.pread(src_fd, min(count, 64 << 20), src_offset))
        if n == 0:
            raise CheckpointError("source file truncated while copying")
        src_offset, count = src_offset + n, count - n


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most max_shard_bytes (one big tensor may exceed)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _header_bytes(specs: list[TensorSpec]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one safetensors shard whose layout is fixed when it is opened.

    Tensors must arrive in the order of `specs`; each is checked against its spec.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], exclusive: bool = True):
        """exclusive=False writes over an existing (e.g. merger.fs.atomic_file's empty temporary) file."""
        self.path, self.specs, self._next = path, specs, 0
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
        self.fd = os.open(path, flags, 0o644)
        os.write(self.fd, _header_bytes(specs))

    def _expect(self, name: str) -> TensorSpec:
        spec = self.specs[self._next]
        if spec.name != name:
            raise CheckpointError(f"writer expected tensor {spec.name!r}, got {name!r}")
        self._next += 1
        return spec

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._expect(name)
        if SAFETENSORS_NAMES[tensor.dtype] != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise CheckpointError(f"tensor {name!r}: {tensor.dtype} {list(tensor.shape)} does not match its spec")
        self._write_bytes(tensor)

    def write_rows(self, name: str, blocks: Iterable[torch.Tensor]) -> None:
        """One tensor written a block of leading rows at a time, in order (the whole tensor is never formed)."""
        spec, rows = self._expect(name), 0
        for block in blocks:
            if SAFETENSORS_NAMES[block.dtype] != spec.dtype or tuple(block.shape[1:]) != spec.shape[1:]:
                shape = list(block.shape)
                raise CheckpointError(f"tensor {name!r}: a {block.dtype} {shape} block of rows does not fit its spec")
            rows += block.shape[0]
            if rows > spec.shape[0]:
                raise CheckpointError(f"tensor {name!r}: blocks hold more than its {spec.shape[0]} rows")
            self._write_bytes(block)
        if rows != spec.shape[0]:
            raise CheckpointError(f"tensor {name!r}: blocks hold {rows} of its {spec.shape[0]} rows")

    def _write_bytes(self, tensor: torch.Tensor) -> None:
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()  # (nbytes,) uint8
        view = memoryview(raw.data)
        while view:
            view = view[os.write(self.fd, view) :]

    def copy(self, name: str, reader: CheckpointReader) -> None:
        spec = self._expect(name)
        if reader.tensors[name].spec != spec:
            raise CheckpointError(f"tensor {name!r}: stored form differs from the output spec")
        reader.copy_into(name, self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            os.close(self.fd)

    def close(self) -> None:
        try:
            if self._next != len(self.specs):
                raise CheckpointError(f"{self.path.name}: {len(self.specs) - self._next} tensors were not written")
            os.fsync(self.fd)
        finally:
            os.close(self.fd)


def write_index(out_dir: Path, shards: list[list[TensorSpec]]) -> None:
    weight_map = {s.name: shard_name(i, len(shards)) for i, shard in enumerate(shards) for s in shard}
    total = sum(s.nbytes for shard in shards for s in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_atomic(out_dir / INDEX_NAME, json.dumps(index, indent=2) + "\n")
