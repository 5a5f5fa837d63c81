"""The OpenAI wire format: one base for every model, the one error shape, and what every endpoint shares.

Per endpoint: `completions`, `chat`, `tokenize`, `models`; the shared sampling
part of a generation request is `sampling`; which request fields OpenAI defines
(and which of those are accepted although they change nothing) is `fields`.

Requests refuse fields they do not declare (`RequestModel`, extra="forbid"):
`service.errors` answers such a field with a 400 naming it in `param`, so
nothing a client sends is ever silently dropped.  Every error the service
returns is `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
import uuid
from http import HTTPStatus
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

UNSUPPORTED_VALUE = "unsupported_value"  # a pydantic error type of validators: service.errors answers it 400


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RequestModel(OpenAIBaseModel):
    """A request body (or a part of one): fields it does not declare are refused, never ignored."""

    model_config = ConfigDict(extra="forbid")
    openai_fields: ClassVar[frozenset[str]] = frozenset()  # what OpenAI defines for it (service.protocol.fields)

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        """OpenAI reads an optional field sent as null as not given: such a field is no request for a feature."""
        if not isinstance(data, dict):
            return data
        not_given = {k for k, v in data.items() if v is None and k in cls.openai_fields and k not in cls.model_fields}
        return {k: v for k, v in data.items() if k not in not_given}


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# errors

ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return ERROR_TYPES.get(status, "invalid_request_error")


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


class APIError(Exception):
    """An error with its HTTP status, rendered in the OpenAI shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or HTTPStatus(status).phrase.lower().replace(" ", "_")

    def response_body(self) -> dict:
        info = ErrorInfo(message=self.message, type=error_type(self.status), param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()


def unsupported(param: str, why: str) -> APIError:
    """The 400 for a parameter this server (or this engine) does not implement."""
    return APIError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


def invalid(param: str, why: str) -> APIError:
    """The 422 for a parameter whose value is wrong (e.g. in combination with another), raised from a validator."""
    return APIError(422, f"{param}: {why}", param=param, code="invalid_request")


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
