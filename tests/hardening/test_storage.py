"""A data dir that is full or read-only: uploads fail with 507 and a clear message; serving goes on.

The data dir is a small tmpfs mounted for the test (needs root: CAP_SYS_ADMIN),
filled with a ballast file or remounted read-only while the server runs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

from tests.hardening.conftest import PROMPTS
from tests.support.uploading import upload_files

TMPFS_SIZE = "64m"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs data dir needs root"),
]


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def tmpfs_server(start_server, tmp_path_factory, tiny_artifacts):
    data_dir = tmp_path_factory.mktemp("tmpfs-data")
    try:
        mount("-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(data_dir))
    except subprocess.CalledProcessError as err:
        pytest.skip(f"cannot mount a tmpfs here: {err.stderr.decode().strip()}")
    server = start_server(data_dir=data_dir)
    assert upload_files(server, "qv", tiny_artifacts["qv"]).status_code == 201
    yield server
    server.kill()
    subprocess.run(["umount", "-l", str(data_dir)], check=False)


def fill(folder) -> None:
    """Write until the filesystem is full."""
    with open(folder / "ballast", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (1 << 20))
            f.flush()


def assert_refused_507(response, why: str) -> None:
    assert response.status_code == 507, response.text
    error = response.json()["error"]
    assert error["code"] == "insufficient_storage" and why in error["message"], error
    assert "Traceback" not in response.text


def assert_still_serving(server, references) -> None:
    assert [server.answer("qv", p, 8) for p in PROMPTS] == references["qv"]


def test_a_full_data_dir_refuses_uploads_with_507_and_serving_goes_on(tmpfs_server, tiny_artifacts, tiny_references):
    fill(tmpfs_server.data_dir)
    try:
        assert_refused_507(upload_files(tmpfs_server, "full", tiny_artifacts["o"]), "No space left on device")
        assert_still_serving(tmpfs_server, tiny_references)
    finally:
        (tmpfs_server.data_dir / "ballast").unlink()
    assert upload_files(tmpfs_server, "roomy", tiny_artifacts["o"]).status_code == 201


def test_a_merge_that_runs_out_of_space_is_a_507_and_leaves_nothing(tmpfs_server, tiny_artifacts, tiny_references):
    fill(tmpfs_server.data_dir)
    ballast = tmpfs_server.data_dir / "ballast"
    os.truncate(ballast, ballast.stat().st_size - (400 << 10))  # room for the upload, not for the merge
    try:
        assert_refused_507(upload_files(tmpfs_server, "halfway", tiny_artifacts["qkvo"]), "No space left on device")
        assert not (tmpfs_server.data_dir / "adapters" / "halfway").exists()
        assert_still_serving(tmpfs_server, tiny_references)
    finally:
        (tmpfs_server.data_dir / "ballast").unlink()


def test_a_read_only_data_dir_refuses_uploads_with_507_and_serving_goes_on(
    tmpfs_server, tiny_artifacts, tiny_references
):
    mount("-o", "remount,ro", str(tmpfs_server.data_dir))
    try:
        assert_refused_507(upload_files(tmpfs_server, "readonly", tiny_artifacts["o"]), "Read-only file system")
        assert_still_serving(tmpfs_server, tiny_references)
    finally:
        mount("-o", "remount,rw", str(tmpfs_server.data_dir))
    assert upload_files(tmpfs_server, "writable", tiny_artifacts["qkvo"]).status_code == 201
