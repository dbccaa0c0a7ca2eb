"""Everything decided about an inference request (/infer, /v1/chat/completions) at the door: key, size, the
upload itself, then admission.

Pure ASGI. The body is read here, whole and within ``UPLOAD_TIMEOUT_S``, in a bounded number of upload places
that are not generation places: a client that trickles its upload holds only its own upload place, and a
request is admitted to the model (and refused when it is full) only once its body is in. Refusals made before
the body is read keep the connection open, so the server reads and discards the rest of the body and the
answer reaches the client instead of a connection reset; only bodies past the upload limit and stalled
uploads are cut off with ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import (
    ClientClosedError,
    OverloadedError,
    PayloadTooLargeError,
    ServiceError,
    UnauthorizedError,
    UploadTimeoutError,
)
from app.http.access_log import INFERENCE_PATH, INFERENCE_PATHS, JOBS_PATH, note
from app.http.envelope import OPENAI_PREFIX, error_response
from app.service.runner import RETRY_AFTER_BUSY_S, ModelState

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
        self.uploads = 0  # bodies being read now (event loop only)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        service = self.service_getter()
        settings = service.settings
        headers = dict(scope.get("headers", [])) if path else {}
        admits = path in INFERENCE_PATHS  # runs the model now; a job submission only queues the upload
        if not (admits or path == JOBS_PATH) or scope.get("method") != "POST":
            if settings.api_key and _needs_key(path, settings) and not key_matches(headers, settings.api_key):
                await _refuse(UnauthorizedError(), path, scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        limit = body_limit(path, settings.max_upload_bytes)
        try:
            if settings.api_key and not key_matches(headers, settings.api_key):
                raise UnauthorizedError()
            declared = headers.get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise PayloadTooLargeError(_too_large(settings.max_upload_mb, path))
            if admits or service.runner.state in (ModelState.failed, ModelState.draining):
                service.runner.check_ready()  # no point in taking the upload (jobs may queue while loading)
            if self.uploads >= settings.max_uploads:
                raise OverloadedError(f"{self.uploads} uploads in progress; retry shortly",
                                      headers={"Retry-After": str(RETRY_AFTER_BUSY_S)})
            body = await self._read_body(receive, limit, path, settings)
            ticket = service.runner.admit() if admits else None
        except ClientClosedError:
            logger.info("client disconnected during the upload")
            note(status=ClientClosedError.status_code, error_type=ClientClosedError.error_type)
            return
        except ServiceError as error:
            note(error_type=error.error_type)
            await _refuse(error, path, scope, receive, send)
            return
        note(admitted=admits)
        scope.setdefault("state", {})["ticket"] = ticket
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            if ticket is not None:
                ticket.release()

    async def _read_body(self, receive: Receive, limit: int, path: str, settings: Any) -> bytes:
        """The whole body, within UPLOAD_TIMEOUT_S and MAX_UPLOAD_MB, holding one upload place meanwhile."""
        self.uploads += 1
        chunks: list[bytes] = []
        received = 0
        deadline = time.monotonic() + settings.upload_timeout_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    message = await asyncio.wait_for(receive(), remaining if remaining > 0 else 0.001)
                except asyncio.TimeoutError:
                    raise UploadTimeoutError(
                        f"the upload did not arrive within UPLOAD_TIMEOUT_S={settings.upload_timeout_s:g} s "
                        f"({received} bytes received)") from None
                if message["type"] == "http.disconnect":
                    raise ClientClosedError("client disconnected during the upload")
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    raise PayloadTooLargeError(_too_large(settings.max_upload_mb, path))
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        finally:
            self.uploads -= 1


def _needs_key(path: str, settings: Any) -> bool:
    """Besides the inference routes: all of the OpenAI-compatible API, the jobs, and /metrics when asked."""
    return (path.startswith(OPENAI_PREFIX) or path == JOBS_PATH or path.startswith(JOBS_PATH + "/")
            or (path == "/metrics" and settings.metrics_require_key))


def _replay(body: bytes, receive: Receive) -> Receive:
    """The app's receive: the body read at the door, then whatever the client sends next (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(error: ServiceError, path: str, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer with the envelope. A body past the limit or a stalled upload also closes the connection: it
    would never finish arriving. Any other refusal leaves it open, and the server discards the unread body
    instead of resetting the connection with it (which loses the answer on the way)."""
    response = error_response(error, path)
    if isinstance(error, (PayloadTooLargeError, UploadTimeoutError)):
        response.headers["Connection"] = "close"
    await response(scope, receive, send)


def body_limit(path: str, max_upload_bytes: int) -> int:
    """A JSON body carries the image base64-encoded: 4/3 of its bytes, plus room for the rest of the request."""
    return max_upload_bytes if path in (INFERENCE_PATH, JOBS_PATH) else max_upload_bytes * 4 // 3 + JSON_ALLOWANCE_BYTES


JSON_ALLOWANCE_BYTES = 64 * 1024


def _too_large(max_upload_mb: float, path: str) -> str:
    if path in (INFERENCE_PATH, JOBS_PATH):
        return f"the upload is larger than MAX_UPLOAD_MB={max_upload_mb:g} MiB"
    return f"the request body is larger than an image of MAX_UPLOAD_MB={max_upload_mb:g} MiB takes, base64-encoded"
