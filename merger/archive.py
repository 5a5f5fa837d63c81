"""Read the two artifact files from a directory, a .tar.gz or a .zip, safely.

Nothing is extracted to disk: the two members are read into memory under a
size cap. Archives holding links, devices, absolute paths or `..` are refused
whole, as are archives with too many members. Pickle weights are never opened.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import lzma
import posixpath
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Literal, cast

from merger.errors import D2LoraError
from merger.fs import PICKLE_SUFFIXES

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ZIP_ENCRYPTED = 0x1  # general purpose bit 0
# magic bytes -> the file class that undoes that compression, opened as cls(path, "rb")
TAR_DECOMPRESSORS: dict[bytes, Callable[[Path, Literal["rb"]], io.BufferedIOBase]] = {
    b"\x1f\x8b": gzip.GzipFile,
    b"BZh": bz2.BZ2File,
    b"\xfd7zXZ\x00": lzma.LZMAFile,
}
TAR_MAGIC, TAR_MAGIC_OFFSET = b"ustar", 257
TAR_HEADER_ALLOWANCE = 4096  # bytes of headers and padding allowed per member beyond its data


class ArtifactError(D2LoraError):
    """The artifact cannot be read or is unsafe."""


@dataclasses.dataclass(frozen=True)
class ArchiveLimits:
    max_member_bytes: int = 4 << 30  # one file, uncompressed
    max_total_bytes: int = 8 << 30  # every file, uncompressed, as declared
    max_members: int = 1000


DEFAULT_LIMITS = ArchiveLimits()


@dataclasses.dataclass(frozen=True)
class ArtifactFiles:
    config: bytes
    weights: bytes


def _check_member_name(name: str) -> str:
    norm = posixpath.normpath(name)
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ArtifactError(f"archive member {name!r} has an absolute path")
    if norm == ".." or norm.startswith("../") or "/../" in f"/{name}/":
        raise ArtifactError(f"archive member {name!r} escapes the archive (path traversal)")
    return norm


def _pick(names: dict[str, int]) -> tuple[str, str]:
    """Find config and weights at the root or in one top-level folder."""
    configs = [n for n in names if posixpath.basename(n) == CONFIG_NAME and n.count("/") <= 1]
    if len(configs) != 1:
        raise ArtifactError(f"expected exactly one {CONFIG_NAME} in the artifact, found {len(configs)}")
    folder = posixpath.dirname(configs[0])
    weights = posixpath.join(folder, WEIGHTS_NAME)
    if weights not in names:
        pickles = [n for n in names if posixpath.dirname(n) == folder and n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ArtifactError(f"{posixpath.basename(pickles[0])}: pickle weights are refused; save as {WEIGHTS_NAME}")
        raise ArtifactError(f"{WEIGHTS_NAME} is missing from the artifact")
    return configs[0], weights


def _read_capped(stream: IO[bytes], name: str, cap: int) -> bytes:
    data = stream.read(cap + 1)
    if len(data) > cap:
        raise ArtifactError(f"{name}: larger than the {cap} byte limit")
    return data


def _check_totals(sizes: dict[str, int], limits: ArchiveLimits) -> None:
    if len(sizes) > limits.max_members:
        raise ArtifactError(f"archive has {len(sizes)} members, more than {limits.max_members}")
    if sum(sizes.values()) > limits.max_total_bytes:
        raise ArtifactError(f"archive unpacks to more than {limits.max_total_bytes} bytes")


def _tar_members(tar: tarfile.TarFile, limits: ArchiveLimits) -> Iterator[tarfile.TarInfo]:
    """Members one header at a time, so a bomb is refused before its data is inflated."""
    total = 0
    for count, member in enumerate(tar, start=1):
        total += member.size
        if count > limits.max_members:
            raise ArtifactError(f"archive has more than {limits.max_members} members")
        if total > limits.max_total_bytes:
            raise ArtifactError(f"archive unpacks to more than {limits.max_total_bytes} bytes")
        if not (member.isfile() or member.isdir()):
            raise ArtifactError(f"archive member {member.name!r} is a link or special file")
        yield member


class _CappedStream:
    """A decompressed tar stream that refuses to go past `cap` bytes.

    tarfile reads PAX records and GNU long names whole before yielding a member,
    so the member-size checks alone cannot stop a header that inflates to gigabytes.
    """

    def __init__(self, stream: io.BufferedIOBase, cap: int):
        self.stream, self.cap = stream, cap

    def _check(self, end: int) -> None:
        if end > self.cap:
            raise ArtifactError(f"archive unpacks to more than {self.cap} bytes (headers included)")

    def tell(self) -> int:
        return self.stream.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check(offset if whence == io.SEEK_SET else self.tell() + offset)
        return self.stream.seek(offset, whence)

    def read(self, size: int = -1) -> bytes:
        size = self.cap + 1 - self.tell() if size is None or size < 0 else size
        self._check(self.tell() + size)
        return self.stream.read(size)


def _capped(stream: io.BufferedIOBase, cap: int) -> IO[bytes]:
    """`stream` behind a _CappedStream, typed as the file object tarfile takes (it uses read, seek, tell)."""
    return cast(IO[bytes], _CappedStream(stream, cap))


def _tar_stream(path: Path) -> io.BufferedIOBase:
    """The archive's bytes after gzip / bzip2 / xz decompression, as a seekable stream."""
    with open(path, "rb") as f:
        magic = f.read(len(max(TAR_DECOMPRESSORS, key=len)))
    opener = next((o for m, o in TAR_DECOMPRESSORS.items() if magic.startswith(m)), None)
    return open(path, "rb") if opener is None else opener(path, "rb")


def is_tar(path: Path) -> bool:
    """Judged by magic bytes alone: tarfile.is_tarfile would already parse (and inflate) a header."""
    with open(path, "rb") as f:
        head = f.read(TAR_MAGIC_OFFSET + len(TAR_MAGIC))
    return head.startswith(tuple(TAR_DECOMPRESSORS)) or head[TAR_MAGIC_OFFSET:] == TAR_MAGIC


def read_tar(path: Path, limits: ArchiveLimits) -> ArtifactFiles:
    cap = limits.max_total_bytes + (limits.max_members + 4) * TAR_HEADER_ALLOWANCE
    with _tar_stream(path) as raw, tarfile.open(fileobj=_capped(raw, cap), mode="r:") as tar:
        members = {_check_member_name(m.name): m for m in _tar_members(tar, limits) if m.isfile()}
        sizes = {name: m.size for name, m in members.items()}
        _check_totals(sizes, limits)
        config_name, weights_name = _pick(sizes)

        def read(name: str) -> bytes:
            stream = tar.extractfile(members[name])
            assert stream is not None  # members holds regular files only
            return _read_capped(stream, name, limits.max_member_bytes)

        return ArtifactFiles(read(config_name), read(weights_name))


def _zip_is_link(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    return (mode & 0o170000) not in (0, 0o100000, 0o040000)


def read_zip(path: Path, limits: ArchiveLimits) -> ArtifactFiles:
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise ArtifactError(f"archive has {len(infos)} members, more than {limits.max_members}")
        for info in infos:
            if _zip_is_link(info):
                raise ArtifactError(f"archive member {info.filename!r} is a link or special file")
            if info.flag_bits & ZIP_ENCRYPTED:
                raise ArtifactError(f"archive member {info.filename!r} is encrypted")
        files = {_check_member_name(i.filename): i for i in infos if not i.is_dir()}
        sizes = {name: i.file_size for name, i in files.items()}
        _check_totals(sizes, limits)
        config_name, weights_name = _pick(sizes)

        def read(name: str) -> bytes:
            with zf.open(files[name]) as stream:  # the cap holds even if file_size lies
                return _read_capped(stream, name, limits.max_member_bytes)

        return ArtifactFiles(read(config_name), read(weights_name))


def read_dir(path: Path, limits: ArchiveLimits) -> ArtifactFiles:
    config, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config.is_file():
        raise ArtifactError(f"{CONFIG_NAME} is missing from {path}")
    if not weights.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ArtifactError(f"{pickles[0]}: pickle weights are refused; save as {WEIGHTS_NAME}")
        raise ArtifactError(f"{WEIGHTS_NAME} is missing from {path}")
    for file in (config, weights):
        if file.stat().st_size > limits.max_member_bytes:
            raise ArtifactError(f"{file.name}: larger than the {limits.max_member_bytes} byte limit")
    return ArtifactFiles(config.read_bytes(), weights.read_bytes())


def read_artifact_files(path: str | Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> ArtifactFiles:
    """The raw bytes of adapter_config.json and adapter_model.safetensors."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such file or directory")
    if path.is_dir():
        return read_dir(path, limits)
    if path.name.endswith(PICKLE_SUFFIXES):
        raise ArtifactError(f"{path.name}: pickle weights are refused; give an adapter folder or archive")
    try:
        if zipfile.is_zipfile(path):
            return read_zip(path, limits)
        if is_tar(path):
            return read_tar(path, limits)
    except (
        tarfile.TarError,
        zipfile.BadZipFile,
        EOFError,
        OSError,
        zlib.error,
        lzma.LZMAError,
        NotImplementedError,
    ) as err:
        raise ArtifactError(f"{path.name}: corrupt archive ({err})") from None
    raise ArtifactError(f"{path.name}: not a folder, .tar.gz or .zip archive")
