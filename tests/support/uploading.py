"""Uploading adapter artifacts to a live server, the ways a user would (multipart over HTTP)."""

from __future__ import annotations

import contextlib
import tarfile
import threading
import time
from pathlib import Path

import httpx

from merger.archive import CONFIG_NAME, WEIGHTS_NAME

UPLOAD_TIMEOUT_S = 900


def post_adapter(
    server, fields: dict, files: dict, params: dict | None = None, headers: dict | None = None
) -> httpx.Response:
    return httpx.post(
        f"{server.url}/adapters",
        data=fields,
        files=files,
        params=params or {},
        headers=server.admin_headers() if headers is None else headers,
        timeout=UPLOAD_TIMEOUT_S,
    )


def upload_files(server, name: str, folder: Path, params: dict | None = None, **_) -> httpx.Response:
    with open(folder / CONFIG_NAME, "rb") as config, open(folder / WEIGHTS_NAME, "rb") as weights:
        return post_adapter(server, {"name": name}, {"config": config, "weights": weights}, params)


def make_archive(folder: Path, archive_dir: Path) -> Path:
    path = archive_dir / f"{folder.name}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for member in (CONFIG_NAME, WEIGHTS_NAME):
            tar.add(folder / member, arcname=f"{folder.name}/{member}")
    return path


def upload_archive(server, name: str, folder: Path, archive_dir: Path, params: dict | None = None) -> httpx.Response:
    with open(make_archive(folder, archive_dir), "rb") as archive:
        return post_adapter(server, {"name": name}, {"archive": archive}, params)


def adapter_records(server) -> dict:
    response = httpx.get(f"{server.url}/adapters", headers=server.admin_headers(), timeout=30)
    response.raise_for_status()
    return {record["name"]: record for record in response.json()["data"]}


def wait_for_status(server, name: str, statuses: set[str], timeout_s: float = UPLOAD_TIMEOUT_S) -> dict:
    """Poll GET /adapters/{name} until its status is one of `statuses`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = httpx.get(f"{server.url}/adapters/{name}", headers=server.admin_headers(), timeout=30).json()
        if record.get("status") in statuses:
            return record
        time.sleep(1)
    raise AssertionError(f"adapter {name} did not reach {statuses} in {timeout_s} s (last: {record})")


BOUNDARY = "trickledboundary"


def trickled_upload(server, name: str, config: bytes, stop: threading.Event) -> None:
    """An upload whose body keeps coming until `stop` (or the server dies)."""

    def body():
        yield (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="config"; filename="c.json"\r\n\r\n'
        ).encode()
        yield config
        yield (f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n').encode()
        while not stop.wait(0.05):
            yield b"\0" * 1024

    headers = {**server.admin_headers(), "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"{server.url}/adapters", content=body(), headers=headers, timeout=60)


def swapping(server, models: tuple[str, ...], prompt: str, stop: threading.Event) -> None:
    """Requests cycling over `models` until `stop`, so the engine swaps all the time."""
    while not stop.is_set():
        for model in models:
            try:
                server.complete(model, prompt, 4, timeout=10)
            except httpx.HTTPError:
                return
