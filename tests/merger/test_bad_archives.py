"""Unsafe and broken archives and pickle weights: refused, nothing unpacked, nothing unpickled."""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from merger.archive import ArchiveLimits, ArtifactError, read_artifact_files
from merger.merge import merge
from tests.merger.refusals import PickleTrap, assert_refused, pack, pickle_only_adapter


def test_pickle_trap_works(tmp_path):
    pickle.loads(pickle.dumps(PickleTrap(tmp_path / "marker")))
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("packing", ["folder", "tar.gz", "zip"])
def test_pickle_weights_are_refused_unopened(capsys, llama, adapter, tmp_path, packing):
    marker = tmp_path / "unpickled"
    path = pack(pickle_only_adapter(adapter, marker), tmp_path / f"adapter.{packing}", packing)
    assert_refused(capsys, llama, path, tmp_path / "out", r"adapter_model.bin: pickle weights are refused")
    assert not marker.exists()


def test_pickle_file_as_adapter_is_refused_unopened(capsys, llama, tmp_path):
    marker, path = tmp_path / "unpickled", tmp_path / "adapter.pt"
    path.write_bytes(pickle.dumps(PickleTrap(marker)))
    assert_refused(capsys, llama, path, tmp_path / "out", r"adapter.pt: pickle weights are refused")
    assert not marker.exists()


def tar_with(dest: Path, adapter: Path, *extra: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(dest, "w:gz") as tar:
        for file in sorted(adapter.iterdir()):
            tar.add(file, arcname=file.name)
        for info in extra:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return dest


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 1) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, size if kind == tarfile.REGTYPE else 0
    return info


TAR_CASES = {
    "traversal": (_member("../evil.txt"), r"'../evil.txt' escapes the archive"),
    "nested traversal": (_member("a/../../evil.txt"), r"escapes the archive"),
    "absolute path": (_member("/etc/evil.txt"), r"'/etc/evil.txt' has an absolute path"),
    "symlink": (_member("link", tarfile.SYMTYPE, "/etc/passwd"), r"'link' is a link or special file"),
    "hardlink": (_member("hard", tarfile.LNKTYPE, "adapter_config.json"), r"'hard' is a link or special file"),
    "device": (_member("dev", tarfile.CHRTYPE), r"'dev' is a link or special file"),
}


@pytest.mark.parametrize("case", TAR_CASES, ids=list(TAR_CASES))
def test_unsafe_tar_members(capsys, llama, good_adapter, tmp_path, case):
    member, message = TAR_CASES[case]
    archive = tar_with(tmp_path / "adapter.tar.gz", good_adapter, member)
    assert_refused(capsys, llama, archive, tmp_path / "out", message)
    assert not (tmp_path / "evil.txt").exists()


def test_symlinked_weights_in_tar(capsys, llama, good_adapter, tmp_path):
    archive = tmp_path / "adapter.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(good_adapter / "adapter_config.json", arcname="adapter_config.json")
        tar.addfile(
            _member("adapter_model.safetensors", tarfile.SYMTYPE, str(good_adapter / "adapter_model.safetensors"))
        )
    assert_refused(capsys, llama, archive, tmp_path / "out", r"is a link or special file")


def zip_with(dest: Path, adapter: Path, name: str, data: bytes = b"x", mode: int | None = None, flags: int = 0) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for file in sorted(adapter.iterdir()):
            zf.write(file, file.name)
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        info.flag_bits |= flags
        zf.writestr(info, data)
    return dest


ZIP_CASES = {
    "traversal": ({"name": "../evil.txt"}, r"escapes the archive"),
    "absolute path": ({"name": "/evil.txt"}, r"has an absolute path"),
    "drive path": ({"name": "C:/evil.txt"}, r"has an absolute path"),
    "symlink": ({"name": "link", "data": b"/etc/passwd", "mode": 0o120777}, r"'link' is a link or special file"),
}


@pytest.mark.parametrize("case", ZIP_CASES, ids=list(ZIP_CASES))
def test_unsafe_zip_members(capsys, llama, good_adapter, tmp_path, case):
    kwargs, message = ZIP_CASES[case]
    archive = zip_with(tmp_path / "adapter.zip", good_adapter, **kwargs)
    assert_refused(capsys, llama, archive, tmp_path / "out", message)


def test_encrypted_zip_member(capsys, llama, good_adapter, tmp_path):
    archive = pack(good_adapter, tmp_path / "adapter.zip", "zip")
    raw = bytearray(archive.read_bytes())
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local and central headers
        start = 0
        while (start := raw.find(signature, start)) >= 0:
            raw[start + flag_offset] |= 0x1  # general purpose bit 0: encrypted
            start += 4
    archive.write_bytes(bytes(raw))
    assert_refused(capsys, llama, archive, tmp_path / "out", r"member .* is encrypted")


@pytest.mark.parametrize(
    "content",
    [b"\x1f\x8b\x08\x00" + b"\x00" * 6 + b"garbage" * 100, b"PK\x03\x04" + b"\xff" * 200],
    ids=["gzip", "zip"],
)
def test_corrupt_archive(capsys, llama, tmp_path, content):
    archive = tmp_path / "adapter.tar.gz"
    archive.write_bytes(content)
    assert_refused(capsys, llama, archive, tmp_path / "out", r"adapter.tar.gz: (corrupt archive|not a folder)")


def test_truncated_tar_gz(capsys, llama, good_adapter, tmp_path):
    archive = pack(good_adapter, tmp_path / "adapter.tar.gz", "tar.gz")
    archive.write_bytes(archive.read_bytes()[:-200])
    assert_refused(capsys, llama, archive, tmp_path / "out", r"adapter.tar.gz: corrupt archive")


SMALL = ArchiveLimits(max_member_bytes=1 << 20, max_total_bytes=2 << 20, max_members=8)


@pytest.mark.parametrize("packing", ["tar.gz", "zip"])
def test_too_many_members(good_adapter, tmp_path, packing):
    folder = Path(shutil.copytree(good_adapter, tmp_path / "adapter"))
    for i in range(10):
        (folder / f"note{i}.txt").write_text("x")
    archive = pack(folder, tmp_path / f"adapter.{packing}", packing)
    with pytest.raises(ArtifactError, match=r"more than 8"):
        read_artifact_files(archive, SMALL)


@pytest.mark.parametrize("packing", ["tar.gz", "zip"])
def test_decompression_bomb_is_refused_before_inflating(llama, good_adapter, tmp_path, packing):
    """A member of zeros far beyond the cap compresses to almost nothing; it must be refused, not inflated."""
    zeros = bytes(64 << 20)
    if packing == "zip":
        archive = tmp_path / "bomb.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.write(good_adapter / "adapter_config.json", "adapter_config.json")
            zf.writestr("adapter_model.safetensors", zeros)
    else:
        archive = tar_with(tmp_path / "bomb.tar.gz", good_adapter, _member("padding.bin", size=len(zeros)), data=zeros)
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(ArtifactError, match=r"(larger than|unpacks to more than)"):
        merge(llama, archive, tmp_path / "out", limits=SMALL)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu-longname"])
def test_tar_header_bomb_is_refused_before_inflating(good_adapter, tmp_path, tar_format):
    """A PAX record or GNU long name of 8 MB (a few KB compressed): tarfile would read it whole."""
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz", format=tar_format) as tar:
        info = _member("adapter_config.json", size=2)
        if tar_format == tarfile.PAX_FORMAT:
            info.pax_headers = {"comment": "x" * (8 << 20)}
        else:
            info.name = "a" * (8 << 20)
        tar.addfile(info, io.BytesIO(b"{}"))
    assert archive.stat().st_size < 100_000
    with pytest.raises(ArtifactError, match=r"unpacks to more than"):
        read_artifact_files(archive, SMALL)


def test_member_larger_than_its_declared_size_is_capped(good_adapter, tmp_path):
    """A zip whose directory declares a small size but whose stream inflates further stops at the cap."""
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(good_adapter / "adapter_config.json", "adapter_config.json")
        zf.writestr("adapter_model.safetensors", bytes(4 << 20))
    raw = bytearray(archive.read_bytes())
    central = raw.rfind(b"PK\x01\x02")  # the last central directory entry: adapter_model.safetensors
    raw[central + 24 : central + 28] = (100).to_bytes(4, "little")  # uncompressed size
    archive.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError):
        read_artifact_files(archive, SMALL)
