"""The one place that knows about threads: model lifecycle, admission bound, deadlines, cancellation."""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Any, Awaitable, Callable

from .errors import DeadlineExceededError, NotReadyError, OverloadedError

logger = logging.getLogger(__name__)

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


class _Job:
    """A queued generation and the event-loop future its result goes to."""

    def __init__(self, request: Any, loop: asyncio.AbstractEventLoop, future: asyncio.Future):
        self.request, self.loop, self.future = request, loop, future
        self.queued_at = time.perf_counter()
        self.started_at: float | None = None

    def abandoned(self) -> bool:
        """Timed out or disconnected while queued: never touches the device."""
        return self.request.cancel.is_set()

    def resolve(self, result: Any) -> None:  # called on the model thread
        self._hand_over(result, None)

    def fail(self, error: BaseException) -> None:
        self._hand_over(None, error)

    def _hand_over(self, result: Any, error: BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)
        except RuntimeError:  # the event loop is closed (shutting down): nobody is waiting any more
            pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


_STOP = object()


class Runner:
    """Runs model work on a single dedicated thread, behind a bounded admission count.

    Requests queue for that thread, which generates whatever is queued as one batch (up to
    ``max_batch_size``). At most ``max_queue`` requests wait beyond a full batch; more are refused at
    once (503), so a burst sheds load instead of piling up memory and latency.
    """

    def __init__(self, max_queue: int, max_batch_size: int = 1, batch_wait_s: float = 0.0):
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue = queue.Queue()
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
        except Exception as error:  # any load failure is reported by /health, not raised
            self.failure_reason = _one_line(error)
            if self.state == ModelState.loading:
                self.state = ModelState.failed
            logger.error("model load failed: %s", self.failure_reason, exc_info=not _is_expected(error))
            return
        self.engine = engine
        self._executor.submit(self._batch_loop)
        self.load_time_s = time.perf_counter() - started
        if self.state == ModelState.loading:
            self.state = ModelState.ready
        logger.info("model ready in %.2f s", self.load_time_s)

    def admit(self) -> Ticket:
        """Reserve a slot or raise at once (503 with Retry-After): not ready, draining, or queue full."""
        if self.state != ModelState.ready:
            message, retry_after_s = _NOT_READY[self.state]
            raise NotReadyError(message, headers={"Retry-After": str(retry_after_s)})
        if self._pending >= self.max_queue + self.max_batch_size:
            raise OverloadedError(
                f"too many requests in flight ({self._pending}); retry shortly",
                headers={"Retry-After": str(RETRY_AFTER_BUSY_S)},
            )
        self._pending += 1
        return Ticket(self)

    async def generate(self, image: Any, prompt: str, max_new_tokens: int, *, inputs: Any = None,
                       timeout_s: float | None = None) -> tuple[Any, float]:
        """Queue one generation for the batching thread; return (result, seconds it waited for the
        model). Past ``timeout_s``, or if the caller is cancelled (client disconnect), the row's cancel
        flag is set: it stops at its next step and frees its place in the batch."""
        from .engine import GenerationRequest

        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        job = _Job(GenerationRequest(image, prompt, max_new_tokens, inputs=inputs), loop, future)
        job.request.on_done = job.resolve
        self._queue.put(job)
        try:
            result = await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except asyncio.TimeoutError:
            job.request.cancel.set()
            raise DeadlineExceededError(f"the request did not finish within {timeout_s:g} s") from None
        except asyncio.CancelledError:
            job.request.cancel.set()
            raise
        return result, (job.started_at or job.queued_at) - job.queued_at

    def _batch_loop(self) -> None:
        """The model thread's life after loading: take everything queued, plus, for up to batch_wait_s,
        requests already admitted but still decoding their upload; generate them as one batch; repeat.
        A request with nobody behind it starts at once."""
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                # Admitted requests not yet queued are on their way (decoding); worth a short wait.
                on_the_way = self._pending - len(batch) - self._queue.qsize() > 0
                remaining = deadline - time.monotonic() if on_the_way else 0
                try:
                    job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    if on_the_way and deadline > time.monotonic():
                        continue
                    break
                if job is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.append(job)
            self._run_batch([job for job in batch if not job.abandoned()])

    def _run_batch(self, jobs: list["_Job"]) -> None:
        if not jobs:
            return
        started = time.perf_counter()
        for job in jobs:
            job.started_at = started
        self._running = len(jobs)  # only this thread writes; the loop only reads
        try:
            self.engine.generate_batch([job.request for job in jobs])
        except Exception as error:  # a bug or device error: fail these requests, keep serving
            logger.exception("generation failed for a batch of %d", len(jobs))
            for job in jobs:
                job.fail(error)
        finally:
            self._running = 0

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
        self._queue.put(_STOP)
        self._executor.shutdown(wait=False, cancel_futures=True)


def _is_expected(error: BaseException) -> bool:
    from .loader import ModelLoadError

    return isinstance(error, ModelLoadError)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
