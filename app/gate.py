"""Everything decided about an /infer request before its body is read: key, size, admission.

Pure ASGI, so a refused request costs no body bytes, and the size limit holds for chunked uploads too.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .access import INFERENCE_PATH
from .envelope import error_response
from .errors import PayloadTooLargeError, ServiceError, UnauthorizedError

logger = logging.getLogger(__name__)


def key_matches(headers: dict[bytes, bytes], api_key: str) -> bool:
    """Bearer token or X-API-Key, compared in constant time."""
    supplied = headers.get(b"x-api-key", b"")
    authorization = headers.get(b"authorization", b"")
    if authorization[:7].lower() == b"bearer ":
        supplied = authorization[7:].strip()
    return hmac.compare_digest(supplied, api_key.encode())


class InferGate:
    def __init__(self, app: ASGIApp, service_getter: Callable[[], Any]):
        self.app = app
        self.service_getter = service_getter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        service = self.service_getter()
        settings = service.settings
        headers = dict(scope.get("headers", [])) if path else {}
        if path == "/metrics" and settings.api_key and settings.metrics_require_key:
            if not key_matches(headers, settings.api_key):
                await _refuse(UnauthorizedError(), scope, receive, send)
                return
        if path != INFERENCE_PATH or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        limit = settings.max_upload_bytes
        try:
            if settings.api_key and not key_matches(headers, settings.api_key):
                raise UnauthorizedError()
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise PayloadTooLargeError(_too_large(settings.max_upload_mb))
            ticket = service.runner.admit()
        except ServiceError as error:
            if error.status_code == 503:
                service.stats.rejected_count += 1
            await _refuse(error, scope, receive, send)
            return
        scope.setdefault("state", {})["ticket"] = ticket
        received = 0
        too_large = False

        async def counting_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Stop feeding the parser; the response below replaces whatever the app says.
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        response_started = False

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if too_large:
                return
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        finally:
            ticket.release()
        if too_large and not response_started:
            await _refuse(PayloadTooLargeError(_too_large(settings.max_upload_mb)), scope, receive, send)


async def _refuse(error: ServiceError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer without reading the request body, and close the connection: the unread body makes it
    unusable for a next request (RFC 9112, 9.6), and saying so keeps clients from reusing it."""
    response = error_response(error)
    response.headers["Connection"] = "close"
    await response(scope, receive, send)


def _too_large(max_upload_mb: float) -> str:
    return f"the upload is larger than MAX_UPLOAD_MB={max_upload_mb:g} MiB"
