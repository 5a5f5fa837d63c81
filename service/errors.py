"""Exception handlers: EVERY error leaves the service as {"error": {"message", "type", "param", "code"}}.

That covers the service's own APIError, request validation (422), Starlette's
404 (unknown route) and 405 (wrong method), user errors from the merger
(D2LoraError -> 400), the scheduler's full queue (429 + Retry-After)
and vanished models (404), a data dir that is full or read-only (507), and
anything unexpected (500, logged with its traceback).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from merger.errors import D2LoraError
from service.protocol import APIError
from service.scheduling.errors import QueueFullError, UnknownModelError

logger = logging.getLogger(__name__)

STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def storage_error(err: BaseException) -> APIError | None:
    """507 for a write the data dir refused (full, over quota, read-only), even wrapped; None for any other error."""
    cause: BaseException | None = err
    while cause is not None and not (isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS):
        cause = cause.__cause__ or cause.__context__
    if not isinstance(cause, OSError):
        return None
    return APIError(
        507,
        f"the data dir cannot store this adapter: {cause.strerror}; nothing was registered",
        code="insufficient_storage",
    )


def render(error: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error.response_body(), status_code=error.status, headers=headers)


def _param(location: tuple) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages.0.role'."""
    parts = [str(p) for p in location if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


ERROR_HEADERS = {
    401: {"WWW-Authenticate": "Bearer"},
    413: {"Connection": "close"},
}  # else the server reads (and drops) the rest of an oversize body


async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return render(exc, ERROR_HEADERS.get(exc.status))


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = _param(tuple(first.get("loc", ())))
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return render(APIError(422, message, param=param, code="invalid_request"))


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return render(APIError(exc.status_code, message), getattr(exc, "headers", None))


async def on_queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
    return render(APIError(429, str(exc), code="queue_full"), {"Retry-After": str(exc.retry_after_s)})


async def on_unknown_model(request: Request, exc: UnknownModelError) -> JSONResponse:
    return render(APIError(404, str(exc), param="model", code="model_not_found"))


async def on_user_error(request: Request, exc: D2LoraError) -> JSONResponse:
    return render(APIError(400, str(exc)))


async def on_os_error(request: Request, exc: OSError) -> JSONResponse:
    failure = storage_error(exc)
    if failure is None:
        return await on_unexpected(request, exc)
    logger.error("%s %s: %s", request.method, request.url.path, failure.message)
    return render(failure)


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return render(APIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))


# exception class -> its handler; Starlette picks the most specific class of a raised exception
HANDLERS: dict[type[Exception], Callable[[Request, Any], Awaitable[JSONResponse]]] = {
    APIError: on_api_error,
    RequestValidationError: on_validation_error,
    StarletteHTTPException: on_http_error,
    QueueFullError: on_queue_full,
    UnknownModelError: on_unknown_model,
    D2LoraError: on_user_error,
    OSError: on_os_error,
    Exception: on_unexpected,
}


def install_error_handlers(app: FastAPI) -> None:
    for kind, handler in HANDLERS.items():
        app.add_exception_handler(kind, handler)
