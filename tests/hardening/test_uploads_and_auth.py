"""Hostile uploads (archives, names, oversize bodies) and auth on every management route, on the live server.

Each refusal is a 4xx in the error shape, registers nothing and leaves no
temp file behind; nothing secret ever shows in a response or in the log.
"""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.hardening.conftest import UPLOAD_CAP_BYTES
from tests.hardening.test_hostile_bodies import assert_sane
from tests.support.hostile import BAD_NAMES, hostile_archives
from tests.support.live import API_KEY, INFERENCE_HEADERS
from tests.support.uploading import adapter_records, post_adapter, upload_files

pytestmark = pytest.mark.slow  # a live server or engine per module (tests/conftest.py: the tiers)


@pytest.fixture(scope="module")
def archives(tiny_artifacts, tmp_path_factory):
    return hostile_archives(tiny_artifacts["qv"], tmp_path_factory.mktemp("hostile"))


def assert_nothing_left(server) -> None:
    assert sorted(adapter_records(server)) == ["o", "qkvo", "qv"]
    (lock,) = (server.data_dir / "tmp").glob("*.lock")
    assert list((server.data_dir / "tmp" / lock.stem).iterdir()) == []


@pytest.mark.parametrize(
    "case",
    [
        "traversal",
        "nested traversal",
        "absolute path",
        "symlink",
        "hardlink",
        "device",
        "decompression bomb",
        "huge member count",
        "zip traversal",
    ],
)
def test_hostile_archives_are_refused(main_server, archives, case):
    with open(archives[case], "rb") as archive:
        response = post_adapter(main_server, {"name": "hostile"}, {"archive": archive})
    assert_sane(response)
    assert response.status_code in (413, 422), response.text
    assert_nothing_left(main_server)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(main_server, tiny_artifacts, name):
    response = upload_files(main_server, name, tiny_artifacts["o"])
    assert_sane(response)
    assert response.status_code == 400 and response.json()["error"]["param"] == "name", response.text
    assert_nothing_left(main_server)


@pytest.mark.parametrize("path", ["..%2F..%2Fetc%2Fpasswd", "%2e%2e", "x" * 300, "%00", "qv%2F..%2Fo"])
def test_odd_names_in_paths_are_404(main_server, path):
    for method in ("GET", "DELETE"):
        response = httpx.request(method, f"{main_server.url}/adapters/{path}", headers=main_server.admin_headers())
        assert_sane(response)
        assert response.status_code == 404, (method, response.text)
    assert_nothing_left(main_server)


def test_a_declared_oversize_upload_is_refused_before_its_body(main_server):
    head = (
        f"POST /adapters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {main_server.admin_token}\r\n"
        f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {UPLOAD_CAP_BYTES + 1}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", main_server.port), timeout=30) as conn:
        conn.sendall(head.encode())  # and not one byte of the body
        answer = ""
        while "}}" not in answer and (chunk := conn.recv(65536)):
            answer += chunk.decode()
    assert answer.startswith("HTTP/1.1 413") and "upload_too_large" in answer, answer


def test_an_undeclared_oversize_upload_is_stopped_at_the_cap_not_buffered_whole(main_server):
    sent = [0]

    def endless():
        yield b'--x\r\nContent-Disposition: form-data; name="archive"; filename="a"\r\n\r\n'
        while sent[0] < 20 * UPLOAD_CAP_BYTES:
            sent[0] += 1 << 20
            yield b"\0" * (1 << 20)

    headers = {**main_server.admin_headers(), "Content-Type": "multipart/form-data; boundary=x"}
    try:
        response = httpx.post(f"{main_server.url}/adapters", content=endless(), headers=headers, timeout=60)
        assert response.status_code == 413, response.text
    except httpx.HTTPError:  # the server answered and closed while the body was still coming
        pass
    assert sent[0] < 10 * UPLOAD_CAP_BYTES
    assert_nothing_left(main_server)


def management_routes(server) -> list[tuple[str, str]]:
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    return [
        (method.upper(), path.replace("{name}", "qv"))
        for path, item in paths.items()
        for method, operation in item.items()
        if "management" in operation.get("tags", [])
    ]


@pytest.mark.parametrize(
    "authorization", [None, "Bearer", "Bearer wrong", f"Bearer {API_KEY}", "Basic abc", "Bearer " + "x" * 10_000]
)
def test_every_management_route_needs_the_admin_token(main_server, authorization):
    routes = management_routes(main_server)
    assert {method for method, _ in routes} == {"GET", "POST", "DELETE"}
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in routes:
        response = httpx.request(method, f"{main_server.url}{path}", headers=headers)
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert (
            authorization is None or authorization.partition(" ")[2] not in response.text or authorization == "Bearer"
        )
    assert sorted(adapter_records(main_server)) == ["o", "qkvo", "qv"]


def test_inference_needs_an_api_key(main_server):
    body = {"model": "qv", "prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + API_KEY}):
        response = httpx.post(f"{main_server.url}/v1/completions", json=body, headers=headers)
        assert response.status_code == 401 and API_KEY not in response.text
    assert httpx.post(f"{main_server.url}/v1/completions", json=body, headers=INFERENCE_HEADERS).status_code == 200


def test_nothing_secret_is_logged(main_server):
    logs = main_server.logs()
    assert main_server.admin_token not in logs and API_KEY not in logs
