"""Request ids at the door: taken from X-Request-ID (sanitized) or generated, set for the request, echoed back."""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.request_context import request_id_var

HEADER = "X-Request-ID"
MAX_LENGTH = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


def sanitize(value: str | None) -> str | None:
    """Keep a client's id only if something usable is left after dropping unsafe characters."""
    if not value:
        return None
    cleaned = _UNSAFE.sub("", value)[:MAX_LENGTH]
    return cleaned or None


class RequestIdMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): sets the contextvar for the whole request and adds the header."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(HEADER.lower().encode(), b"").decode("latin-1")
        request_id = sanitize(incoming) or uuid.uuid4().hex
        token = request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
