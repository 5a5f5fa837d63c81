"""Which replica answered: two response headers, so routing in front of several replicas is visible.

`X-D2LoRA-Replica` names the server (`<hostname>:<port>`: unique per container, and per process
on one host), `X-D2LoRA-Resident` lists the models whose weights were in an engine when the
response began, comma-separated (empty until the engines have started).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.settings import Settings

REPLICA_HEADER = "X-D2LoRA-Replica"
RESIDENT_HEADER = "X-D2LoRA-Resident"


def replica_name(settings: Settings) -> str:
    return f"{socket.gethostname()}:{settings.port}"


class ReplicaHeaders:
    """ASGI middleware: every HTTP response carries the replica's name and its resident models."""

    def __init__(self, app: ASGIApp, replica: str, resident: Callable[[], list[str]]):
        self.app, self.replica, self.resident = app, replica, resident

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[REPLICA_HEADER] = self.replica
                headers[RESIDENT_HEADER] = ",".join(self.resident())
            await send(message)

        await self.app(scope, receive, send_with_headers)
