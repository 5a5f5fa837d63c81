"""Helpers for the bad-input tests: run the real CLI and check a refusal, pickle traps, packing."""

from __future__ import annotations

import pathlib
import pickle
import re
import tarfile
import zipfile
from pathlib import Path

from merger.fs import TMP_MARKER
from service.cli import main


def run_merge(capsys, base: Path, adapter: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), *extra])
    return code, capsys.readouterr().err


def assert_refused(capsys, base: Path, adapter: Path, out: Path, message: str) -> None:
    code, err = run_merge(capsys, base, adapter, out)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("d2lora merge: error: "), err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if TMP_MARKER in p.name]


class PickleTrap:
    """Unpickling this touches a marker file: proof that a pickle was opened."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def pickle_only_adapter(adapter: Path, marker: Path) -> Path:
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(PickleTrap(marker)))
    return adapter


def pack(folder: Path, dest: Path, packing: str) -> Path:
    if packing == "folder":
        return folder
    if packing == "zip":
        with zipfile.ZipFile(dest, "w") as zf:
            for file in sorted(folder.iterdir()):
                zf.write(file, f"adapter/{file.name}")
        return dest
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(folder, arcname="adapter")
    return dest
