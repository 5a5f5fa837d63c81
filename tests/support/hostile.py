"""Hostile uploads, shared by tests/hardening and benchmarks/load_test.py: archives and adapter names.

Every archive holds a valid adapter plus one hostile thing, so only that thing
can be the reason it is refused.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

BOMB_BYTES = 256 << 20  # zeros, a few hundred KiB once gzipped; over any cap a test server sets
MANY_MEMBERS = 5000

BAD_NAMES = [
    "a/b",
    "..",
    "../etc",
    "/abs",
    "ünïcödé",
    "x" * 200,
    "UPPER",
    ".hidden",
    "-dash",
    "a b",
    "a\\b",
    "a%2Fb",
    "%2e%2e",
    "name\x00",
    "名前",
    "😀",
    "a" * 65,
    "",
    " ",
]


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 1) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, size if kind == tarfile.REGTYPE else 0
    return info


def _tar(dest: Path, adapter: Path, add: Callable[[tarfile.TarFile], None]) -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        for file in sorted(adapter.iterdir()):
            tar.add(file, arcname=file.name)
        add(tar)
    return dest


class _Zeros(io.RawIOBase):
    """`size` zero bytes, read lazily (a bomb is written without holding it in memory)."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def _add_one(info: tarfile.TarInfo, data: bytes = b"x") -> Callable[[tarfile.TarFile], None]:
    return lambda tar: tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def _add_bomb(tar: tarfile.TarFile) -> None:
    tar.addfile(_member("bomb.bin", size=BOMB_BYTES), io.BufferedReader(_Zeros(BOMB_BYTES)))


def _add_many(tar: tarfile.TarFile) -> None:
    for i in range(MANY_MEMBERS):
        tar.addfile(_member(f"m/{i}.txt"), io.BytesIO(b"x"))


TAR_CASES: dict[str, Callable[[tarfile.TarFile], None]] = {
    "traversal": _add_one(_member("../evil.txt")),
    "nested traversal": _add_one(_member("a/../../evil.txt")),
    "absolute path": _add_one(_member("/etc/evil.txt")),
    "symlink": _add_one(_member("adapter_model.safetensors.link", tarfile.SYMTYPE, "/etc/passwd")),
    "hardlink": _add_one(_member("hard", tarfile.LNKTYPE, "/etc/passwd")),
    "device": _add_one(_member("dev", tarfile.CHRTYPE)),
    "decompression bomb": _add_bomb,
    "huge member count": _add_many,
}


def _zip_traversal(dest: Path, adapter: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as z:
        for file in sorted(adapter.iterdir()):
            z.write(file, arcname=file.name)
        z.writestr("../../evil.txt", "x")
    return dest


def hostile_archives(adapter: Path, out_dir: Path) -> dict[str, Path]:
    """case name -> an archive file of `adapter` plus that hostile thing."""
    out_dir.mkdir(parents=True, exist_ok=True)
    archives = {case: _tar(out_dir / f"{i}.tar.gz", adapter, add) for i, (case, add) in enumerate(TAR_CASES.items())}
    archives["zip traversal"] = _zip_traversal(out_dir / "traversal.zip", adapter)
    return archives
