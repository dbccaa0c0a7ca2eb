"""One access log line and the request metrics per HTTP request, from a pure ASGI middleware.

Handlers add what they learn (image size, tokens, finish reason, error type) to the request's
``AccessRecord`` through a contextvar; the middleware writes it out once the response is sent.
"""

from __future__ import annotations

import contextvars
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ClientClosedError, OverloadedError
from app.metrics import Metrics, endpoint_label
from app.service.schemas import InferMetadata

logger = logging.getLogger("app.access")
INFERENCE_PATH = "/infer"
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
INFERENCE_PATHS = (INFERENCE_PATH, CHAT_COMPLETIONS_PATH)  # each runs the model: the gate admits them
JOBS_PATH = "/jobs"  # its uploads are read at the door too, then queued as jobs


@dataclass
class AccessRecord:
    method: str
    path: str
    status: int = 0
    duration_s: float = 0.0
    image_size: list[int] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error_type: str | None = None
    admitted: bool = False  # past the door: an error now is a failure, not a refusal


_record: contextvars.ContextVar[AccessRecord | None] = contextvars.ContextVar("access_record", default=None)


def note(**fields: Any) -> None:
    """Attach facts about the current request to its access line (no-op outside a request)."""
    record = _record.get()
    if record is not None:
        for name, value in fields.items():
            setattr(record, name, value)


def note_answer(metadata: InferMetadata) -> None:
    """What an answered inference request adds to its access line."""
    note(image_size=metadata.image_size, prompt_tokens=metadata.prompt_tokens,
         completion_tokens=metadata.completion_tokens, finish_reason=metadata.finish_reason)


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, metrics_getter: Callable[[], Metrics]):
        self.app = app
        self.metrics_getter = metrics_getter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = AccessRecord(scope["method"], scope["path"])
        token = _record.set(record)
        started = time.perf_counter()

        async def send_and_watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            record.duration_s = round(time.perf_counter() - started, 4)
            self._record(record)
            _record.reset(token)

    def _record(self, record: AccessRecord) -> None:
        metrics = self.metrics_getter()
        status = record.status or 500
        metrics.requests.labels(endpoint_label(record.path), str(status)).inc()
        inference = record.path in INFERENCE_PATHS and record.method == "POST"
        if inference:
            metrics.request_duration.labels(record.path).observe(record.duration_s)
            # A client that hung up was neither refused nor failed (it counts as cancelled).
            if record.error_type and status != ClientClosedError.status_code:
                if not record.admitted or record.error_type == OverloadedError.error_type:  # a refusal: retry
                    counter = metrics.rejected
                else:  # who failed: the service (5xx, what ops alert on) or the request (4xx)
                    counter = metrics.failed if status >= 500 else metrics.client_errors
                counter.labels(record.path, record.error_type).inc()
        fields = {k: v for k, v in asdict(record).items() if v is not None and k != "admitted"}
        level = logging.INFO if inference else logging.DEBUG  # probes stay quiet
        logger.log(level, "%s %s %s %.3fs", record.method, record.path, status, record.duration_s,
                   extra={"access": fields})
