"""uvicorn with a drain: the first SIGTERM/SIGINT stops admitting work but lets in-flight requests finish."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.service.inference import InferenceService
from app.service.runner import ABORT_FLUSH_S, shutdown_error

logger = logging.getLogger(__name__)


def header_timeout_protocol(timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol, plus a deadline for each request's headers: a connection that opens and sends
    nothing, or trickles its headers, is closed after ``timeout_s`` instead of holding a socket forever."""

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                logger.info("closing a connection that sent no complete request headers within %.0f s", timeout_s)
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            self._disarm()  # from here uvicorn's keep-alive timeout watches the idle connection
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


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
                            http=header_timeout_protocol(settings.header_timeout_s),
                            timeout_keep_alive=settings.header_timeout_s,
                            timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)))
    DrainingServer(config, service).run()
