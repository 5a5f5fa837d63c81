"""Bearer tokens: the admin token for /adapters, optional API keys for /v1.

With no D2LORA_ADMIN_TOKEN, a token is generated once and kept in
`<data_dir>/admin_token` (mode 0600); the log says where, never what.  Every
comparison is constant-time.  Failures are 401 in the OpenAI error shape.
"""

from __future__ import annotations

import hmac
import logging
import secrets

from fastapi import Request

from merger.fs import write_atomic
from service.protocol import APIError
from service.settings import Settings

logger = logging.getLogger(__name__)

TOKEN_FILE = "admin_token"
SCHEME = "bearer"


def admin_token(settings: Settings) -> str:
    """The configured token, else the stored one, else a new one stored for next time."""
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    path = settings.data_dir / TOKEN_FILE
    if path.is_file():
        logger.info("admin token: read from %s", path)
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, secrets.token_urlsafe(32) + "\n", mode=0o600)  # 0600 from the first byte
    logger.warning("admin token: generated and stored in %s (mode 0600); send it as 'Authorization: Bearer ...'", path)
    return path.read_text().strip()


def bearer(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == SCHEME and credentials.strip() else None


def _matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _any_matches(given: str, expected: list[str]) -> bool:
    return any([_matches(given, key) for key in expected])  # noqa: C419  (a list: every key is compared)


class Authenticator:
    def __init__(self, admin: str, api_keys: list[str]):
        self.admin = admin
        self.api_keys = api_keys

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        return cls(admin_token(settings), [key.get_secret_value() for key in settings.api_keys])

    def check_admin(self, request: Request) -> None:
        token = bearer(request)
        if token is None or not _matches(token, self.admin):
            raise _unauthorized(token, "the admin token")

    def check_inference(self, request: Request) -> None:
        if not self.api_keys:
            return
        token = bearer(request)
        if token is None or not _any_matches(token, [*self.api_keys, self.admin]):
            raise _unauthorized(token, "an API key")


def _unauthorized(token: str | None, what: str) -> APIError:
    reason = "missing" if token is None else "not valid"
    return APIError(401, f"Authorization: Bearer <{what}> is {reason}", code="invalid_api_key")


def require_admin(request: Request) -> None:
    """FastAPI dependency of the management routes."""
    request.app.state.auth.check_admin(request)


def require_api_key(request: Request) -> None:
    """FastAPI dependency of the inference routes."""
    request.app.state.auth.check_inference(request)
