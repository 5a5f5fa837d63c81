"""Bearer tokens on a live server: the admin token for /adapters, API keys for /v1, 401 in the OpenAI shape."""

from __future__ import annotations

import stat

import httpx
import openai
import pytest

from tests.support.live import API_KEY


def test_the_generated_admin_token_is_private_and_never_logged(live_server):
    path = live_server.data_dir / "admin_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    log = live_server.log_tail(lines=10_000)
    assert str(path) in log and live_server.admin_token not in log


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}, {"Authorization": f"Bearer {API_KEY}"}],
)
def test_management_needs_the_admin_token(live_server, headers):
    for method, path in [
        ("GET", "/adapters"),
        ("GET", "/adapters/qv"),
        ("DELETE", "/adapters/qv"),
        ("POST", "/adapters"),
    ]:
        response = httpx.request(method, f"{live_server.url}{path}", headers=headers)
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"


def test_the_admin_token_opens_management(live_server):
    assert httpx.get(f"{live_server.url}/adapters", headers=live_server.admin_headers()).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}])
def test_inference_needs_an_api_key_when_keys_are_configured(live_server, headers):
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions"):
        response = httpx.request(
            "GET" if path == "/v1/models" else "POST",
            f"{live_server.url}{path}",
            headers=headers,
            json={"model": live_server.base_name, "prompt": "x"},
        )
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_the_openai_client_with_a_wrong_key_gets_an_authentication_error(live_server):
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        client.models.list()
    assert err.value.body["code"] == "invalid_api_key"


def test_a_valid_api_key_opens_inference(live_server):
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=API_KEY, max_retries=0)
    assert live_server.base_name in [m.id for m in client.models.list()]


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_operations_need_no_token(live_server, path):
    assert httpx.get(f"{live_server.url}{path}").status_code == 200
