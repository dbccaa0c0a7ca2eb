"""uvicorn with a drain: the first SIGTERM/SIGINT stops admitting work but lets in-flight requests finish."""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from .serving import InferenceService

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """On the first signal: /health says draining, /infer answers 503, running requests finish (up to
    SHUTDOWN_GRACE_S); then a normal uvicorn shutdown and exit status 0. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, service: InferenceService):
        super().__init__(config)
        self.service = service
        self._drain_deadline: float | None = None

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
            idle = self.service.runner.pending == 0
            if idle or time.monotonic() >= self._drain_deadline:
                if not idle:
                    logger.warning("grace period over with %d request(s) unfinished", self.service.runner.pending)
                self.should_exit = True
        return await super().on_tick(counter)


def serve(service: InferenceService, app) -> None:
    settings = service.settings
    config = uvicorn.Config(app, host=settings.host, port=settings.port, workers=1, log_config=None,
                            timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)))
    DrainingServer(config, service).run()
