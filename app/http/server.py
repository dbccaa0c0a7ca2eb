"""uvicorn with a drain: the first SIGTERM/SIGINT stops admitting work but lets in-flight requests finish."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from types import FrameType
from typing import Callable

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.metrics import Metrics
from app.service.inference import InferenceService
from app.service.runner import ABORT_FLUSH_S, shutdown_error

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("app.access")


MAX_HEAD_BYTES = 32 * 1024  # request line and headers; nginx allows 4 x 8 KB, h11 16 KB


def _refusal(status: str, error_type: str, message: str) -> bytes:
    """A complete HTTP/1.1 answer in the service's error envelope, for refusals made before any request exists."""
    body = json.dumps({"error": {"type": error_type, "message": message, "request_id": None}}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


def _refusals(*entries: tuple[str, int, str, str, str]) -> dict[str, tuple[int, str, bytes]]:
    return {reason: (status, error_type, _refusal(f"{status} {phrase}", error_type, message))
            for reason, status, phrase, error_type, message in entries}


# Answered by the protocol itself: no route (nor its middlewares) ever sees these requests.
REFUSALS = _refusals(
    ("head_too_large", 431, "Request Header Fields Too Large", "request_header_too_large",
     f"the request line and headers are over {MAX_HEAD_BYTES // 1024} KiB"),
    ("too_many_connections", 503, "Service Unavailable", "overloaded", "too many connections are open; retry shortly"),
    ("not_http", 400, "Bad Request", "invalid_request",
     "the request is not valid HTTP/1.1 (malformed request line, header or chunk)"),
)


def count_refusal(metrics: Metrics) -> Callable[[str, str], None]:
    """What a refusal at the protocol leaves behind: the access line and vlm_requests_total, as a routed
    request's would (endpoint "other": the path, if any, was never parsed)."""

    def record(reason: str, peer: str) -> None:
        status, error_type, _ = REFUSALS[reason]
        metrics.requests.labels("other", str(status)).inc()
        access_logger.info("- - %s 0.000s", status, extra={"access": {"status": status, "error_type": error_type,
                                                                      "client": peer}})

    return record


def guarded_protocol(header_timeout_s: float, body_timeout_s: float, max_connections: int,
                     on_refusal: Callable[[str, str], None] = lambda reason, peer: None) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol with the limits a server facing the open network needs, on every route:
    - a request's headers must arrive within ``header_timeout_s`` and fit in MAX_HEAD_BYTES (else 431), so a
      connection that sends nothing, trickles, or streams endless headers holds neither a socket nor memory;
    - a request's body must arrive within ``body_timeout_s`` (the upload routes answer 408 before that; this
      closes the connection of any other route a client drips a body into);
    - at most ``max_connections`` connections: past it, the one that has been sending its request the longest
      is closed to make room, so new clients (health probes among them) are still answered;
    - what is not HTTP gets the error envelope (uvicorn answers plain text), and every refusal here is logged
      and counted through ``on_refusal``, as routed requests are."""

    connections: dict["GuardedProtocol", None] = {}  # insertion order: the oldest first

    class GuardedProtocol(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None
        _head_bytes = 0
        _in_head = True  # receiving a request line and headers (or waiting for the first byte of one)
        _receiving_since: float | None = None  # while a request (head or body) is on its way in

        def _arm(self, timeout_s: float, why: str) -> None:
            self._disarm()
            self._timer = self.loop.call_later(timeout_s, self._too_slow, why)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _refuse(self, reason: str) -> None:
            if self.transport.is_closing():
                return
            self.transport.write(REFUSALS[reason][2])
            self.transport.close()
            peer = "%s:%d" % self.client if self.client else "-"
            on_refusal(reason, peer)

        def send_400_response(self, msg: str) -> None:  # uvicorn's answer to a request its parser rejects
            self._refuse("not_http")

        def _too_slow(self, why: str) -> None:
            self._timer = None
            if not self.transport.is_closing():
                logger.info("closing a connection that %s", why)
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._receiving_since = time.monotonic()
            self._arm(header_timeout_s, f"sent no complete request headers within {header_timeout_s:.0f} s")
            if len(connections) >= max_connections and not self._make_room():
                self._refuse("too_many_connections")
                return
            connections[self] = None

        def _make_room(self) -> bool:
            """Close the connection that has been receiving its request the longest; False when none is."""
            slowest = min((other for other in connections if other._receiving_since is not None),
                          key=lambda other: other._receiving_since, default=None)
            if slowest is None:
                return False
            logger.info("connection limit (%d) reached: closing the one slowest to send its request", max_connections)
            connections.pop(slowest, None)
            slowest.transport.close()
            return True

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._in_head and self._head_bytes > MAX_HEAD_BYTES:
                self._refuse("head_too_large")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._receiving_since = self._receiving_since or time.monotonic()
            self._arm(header_timeout_s, f"sent no complete request headers within {header_timeout_s:.0f} s")

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._arm(body_timeout_s, f"sent no complete request body within {body_timeout_s:.0f} s")
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            self._receiving_since = None
            super().on_message_complete()

        def on_response_complete(self) -> None:
            if self._receiving_since is None:  # the request is in whole: uvicorn's keep-alive timeout takes over
                self._disarm()
                self._in_head, self._head_bytes = True, 0
            # else a client still dripping a body the route never read: the body deadline stays armed
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            connections.pop(self, None)
            super().connection_lost(exc)

    return GuardedProtocol


class DrainingServer(uvicorn.Server):
    """On the first signal: /health says draining, /infer answers 503, running requests finish (up to
    SHUTDOWN_GRACE_S); then a normal uvicorn shutdown and exit status 0. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, service: InferenceService):
        super().__init__(config)
        self.service = service
        self._drain_deadline: float | None = None
        self._aborted_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_deadline is not None:
            logger.warning("second %s: exiting without waiting", signal.Signals(sig).name)
            self.should_exit = self.force_exit = True
            return
        grace_s = self.service.settings.shutdown_grace_s
        self._drain_deadline = time.monotonic() + grace_s
        self.service.runner.begin_drain()
        logger.info("%s received: draining (up to %.0f s for in-flight requests)", signal.Signals(sig).name,
                    grace_s)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_deadline is not None and not self.should_exit:
            runner = self.service.runner
            now = time.monotonic()
            if runner.pending == 0 or (self._aborted_at is not None and now >= self._aborted_at + ABORT_FLUSH_S):
                self.should_exit = True
            elif self._aborted_at is None and now >= self._drain_deadline:
                logger.warning("grace period over with %d request(s) unfinished: answering them 503", runner.pending)
                runner.abort(shutdown_error())
                self._aborted_at = now
        return await super().on_tick(counter)


def serve(service: InferenceService, app) -> None:
    settings = service.settings
    config = uvicorn.Config(app, host=settings.host, port=settings.port, workers=1, log_config=None,
                            http=guarded_protocol(settings.header_timeout_s, settings.upload_timeout_s + 5,
                                                  settings.max_connections, count_refusal(service.prometheus)),
                            timeout_keep_alive=settings.header_timeout_s,
                            timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)))
    DrainingServer(config, service).run()
