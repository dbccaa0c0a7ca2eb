"""The one place that knows about threads: model lifecycle, admission bound, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Any, Awaitable, Callable, TypeVar

from .errors import DeadlineExceededError, NotReadyError, OverloadedError

logger = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_AFTER_BUSY_S = 2


class ModelState(str, Enum):
    loading = "loading"
    ready = "ready"
    failed = "failed"
    draining = "draining"


_NOT_READY = {
    ModelState.loading: ("the model is still loading; retry shortly", 10),
    ModelState.failed: ("the model failed to load; see /health for the reason", 60),
    ModelState.draining: ("the service is shutting down; retry on another instance", 5),
}


class Ticket:
    """An admitted request's slot; released exactly once, when the request is finished."""

    def __init__(self, runner: "Runner"):
        self._runner = runner
        self._released = False
        self.admitted_at = time.perf_counter()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._runner._pending -= 1


class Runner:
    """Runs model work on a single dedicated thread, behind a bounded admission count.

    At most ``max_queue`` requests wait behind the one running; more are refused at once (503), so a
    burst sheds load instead of piling up memory and latency.
    """

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.state = ModelState.loading
        self.failure_reason: str | None = None
        self.engine: Any = None
        self.load_time_s: float | None = None
        self._pending = 0  # admitted and not finished: waiting + running
        self._running = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    @property
    def pending(self) -> int:
        """Admitted requests not finished yet (waiting or running)."""
        return self._pending

    @property
    def queue_depth(self) -> int:
        """Admitted requests not yet on the device."""
        return self._pending - self._running

    @property
    def in_flight(self) -> int:
        return self._running

    async def load(self, load_engine: Callable[[], Any], *alongside: Awaitable[Any]) -> None:
        """Build the engine on the model thread (and await ``alongside`` meanwhile); flip to ready or
        failed. Never raises."""
        started = time.perf_counter()
        try:
            loading = asyncio.get_running_loop().run_in_executor(self._executor, load_engine)
            engine, *_ = await asyncio.gather(loading, *alongside)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # any load failure is reported by /health, not raised
            self.failure_reason = _one_line(error)
            if self.state == ModelState.loading:
                self.state = ModelState.failed
            logger.error("model load failed: %s", self.failure_reason, exc_info=not _is_expected(error))
            return
        self.engine = engine
        self.load_time_s = time.perf_counter() - started
        if self.state == ModelState.loading:
            self.state = ModelState.ready
        logger.info("model ready in %.2f s", self.load_time_s)

    def admit(self) -> Ticket:
        """Reserve a slot or raise at once (503 with Retry-After): not ready, draining, or queue full."""
        if self.state != ModelState.ready:
            message, retry_after_s = _NOT_READY[self.state]
            raise NotReadyError(message, headers={"Retry-After": str(retry_after_s)})
        if self._pending >= self.max_queue + 1:
            raise OverloadedError(
                f"too many requests in flight ({self._pending}); retry shortly",
                headers={"Retry-After": str(RETRY_AFTER_BUSY_S)},
            )
        self._pending += 1
        return Ticket(self)

    async def run(self, work: Callable[[threading.Event], T], *, timeout_s: float | None = None,
                  on_start: Callable[[], None] | None = None) -> T:
        """Run ``work(cancel)`` on the model thread. Past ``timeout_s`` (or if the caller is cancelled, e.g.
        a client disconnect) the cancel flag is set, so generation stops at its next step and the device
        is free for the next request."""
        cancel = threading.Event()

        def on_thread() -> T:
            if cancel.is_set():  # gave up while queued: do not touch the device at all
                raise asyncio.CancelledError()
            self._running += 1  # only the model thread writes while the loop reads: a plain int is fine
            try:
                if on_start is not None:
                    on_start()
                return work(cancel)
            finally:
                self._running -= 1

        future = asyncio.get_running_loop().run_in_executor(self._executor, on_thread)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except asyncio.TimeoutError:
            cancel.set()
            raise DeadlineExceededError(f"the request did not finish within {timeout_s:g} s") from None
        except asyncio.CancelledError:
            cancel.set()
            raise

    def begin_drain(self) -> None:
        if self.state in (ModelState.ready, ModelState.loading):
            self.state = ModelState.draining

    async def wait_idle(self, grace_s: float) -> bool:
        """Wait until no admitted request is left, up to ``grace_s``; True when idle."""
        deadline = time.monotonic() + grace_s
        while self._pending > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self._pending == 0

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _is_expected(error: BaseException) -> bool:
    from .loader import ModelLoadError

    return isinstance(error, ModelLoadError)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
