"""The file system, written one way everywhere: atomically and durably.

A file is written to a temporary sibling, flushed and fsynced, renamed over its
target, and the folder is fsynced, so a crash leaves the old file or the new one,
never a torn one.  A folder is filled under a temporary sibling name and renamed
into place only when complete.  Temporary names start with a dot and carry
TMP_MARKER, so a cleaner can recognise them.  Also here: the file suffixes that
are never opened (pickles) and those a merged checkpoint never copies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_MARKER = ".d2lora-tmp-"
# Pickle files can run code when loaded: refused everywhere, never opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
# Weight files a merged checkpoint writes anew (or never carries): not copied from the base.
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".lock", *PICKLE_SUFFIXES)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_sibling(path: Path) -> Path:
    """A fresh hidden name beside `path` (same folder, so a rename is atomic)."""
    return path.with_name(f".{path.stem}{TMP_MARKER}{uuid.uuid4().hex}{path.suffix}")  # savefig reads the suffix


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path to write `path` through; on success fsync it and rename it into place.

    The folder is created if missing.  The temporary file is created empty with `mode` before the caller
    writes (so a secret is never readable by others, not even briefly); on failure it is removed and `path`
    is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str, mode: int = 0o644) -> None:
    """Replace `path` with `data` (bytes, or text as UTF-8) atomically and durably."""
    raw = data.encode() if isinstance(data, str) else data
    with atomic_file(path, mode) as tmp, open(tmp, "wb") as f:
        f.write(raw)


def save_atomic(path: str | Path, save: Callable[[Path], object]) -> None:
    """`save(tmp_path)` writes the file in whatever way a library does (safetensors, matplotlib); then it is
    fsynced and renamed into place."""
    with atomic_file(path) as tmp:
        save(tmp)


def create_exclusive(path: Path, data: bytes) -> bool:
    """Like write_atomic, but only if `path` does not exist yet (False then): claims a name among replicas."""
    tmp = temporary_sibling(path)
    write_atomic(tmp, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    fsync_dir(path.parent)
    return True


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; rename it to out_dir when complete, delete it on failure.

    out_dir must not exist.  The folder ends up with mode 0755 (mkdtemp makes it 0700).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{TMP_MARKER}", dir=out_dir.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out_dir.parent)
