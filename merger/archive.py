"""Read the two artifact files from a directory, a .tar.gz or a .zip, safely.

Nothing is extracted to disk: the two members are read into memory under a
size cap. Archives holding links, devices, absolute paths or `..` are refused
whole, as are archives with too many members. Pickle weights are never opened.
"""

from __future__ import annotations

import dataclasses
import lzma
import posixpath
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from merger.errors import D2LoraError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ZIP_ENCRYPTED = 0x1  # general purpose bit 0


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


def read_tar(path: Path, limits: ArchiveLimits) -> ArtifactFiles:
    with tarfile.open(path, mode="r:*") as tar:
        members = {_check_member_name(m.name): m for m in _tar_members(tar, limits) if m.isfile()}
        sizes = {name: m.size for name, m in members.items()}
        _check_totals(sizes, limits)
        config_name, weights_name = _pick(sizes)
        read = lambda n: _read_capped(tar.extractfile(members[n]), n, limits.max_member_bytes)
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
        if tarfile.is_tarfile(path):
            return read_tar(path, limits)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, zlib.error, lzma.LZMAError, NotImplementedError) as err:
        raise ArtifactError(f"{path.name}: corrupt archive ({err})") from None
    raise ArtifactError(f"{path.name}: not a folder, .tar.gz or .zip archive")
