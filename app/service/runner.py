"""The one place that knows about threads: model lifecycle, admission bound, deadlines, cancellation, and
the model thread that runs the scheduler step after step."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Any, AsyncIterator, Awaitable, Callable

from app.errors import (
    DeadlineExceededError,
    ModelLoadError,
    NotReadyError,
    OverloadedError,
    one_line,
)
from app.model.scheduler import DEFAULT_DECODING_PREFILL_TOKEN_BUDGET, DEFAULT_PREFILL_TOKEN_BUDGET, Scheduler
from app.model.sequence import GenerationResult, PreparedInputs, Sequence

logger = logging.getLogger(__name__)

RETRY_AFTER_BUSY_S = 2
ABORT_FLUSH_S = 1.0  # after answering the unfinished requests 503 at shutdown, time for those answers to go out


class ModelState(str, Enum):
    loading = "loading"
    ready = "ready"
    failed = "failed"
    draining = "draining"


# The one table of not-ready states: what /health and a refused request say, and when to retry.
NOT_READY = {
    ModelState.loading: ("the model is still loading; retry shortly", 10),
    ModelState.failed: ("the model failed to load: {reason}", 60),
    ModelState.draining: ("the service is shutting down; retry on another instance", 5),
}


class Ticket:
    """An admitted request's place. Its units (the request, or each of its pages) count as waiting until each
    gets a KV slot or ends without one, and the request counts as admitted until it ends. A background ticket
    (a job's) yields the next free slot to synchronous requests."""

    def __init__(self, runner: "Runner", timeout_s: float | None = None, background: bool = False):
        self._runner = runner
        self._released = False
        self._waiting = 1
        self.background = background
        self.admitted_at = time.perf_counter()
        self.timeout_s = timeout_s  # its deadline, counted from admission (None: the service's default)

    def expect(self, units: int) -> None:
        """The request runs as ``units`` sequences (pages): each waits on its own. Before any has started."""
        self._runner._add_waiting(self, units - 1)

    def left_queue(self) -> None:
        """One unit got a KV slot (the model thread) or ended without one (the event loop)."""
        self._runner._add_waiting(self, -1)

    def release(self) -> None:  # the event loop: the request is answered
        if not self._released:
            self._released = True
            self._runner._add_waiting(self, -self._waiting)
            self._runner._pending -= 1


class Mailbox:
    """What the model thread hands the event loop, sent once per scheduler step: one wake-up of the loop for
    every row's tokens and outcomes of that step, not one per token per row (at 32 streaming rows, the loop's
    self-pipe writes cost more host time than the rest of the step). Kept in order, so a row's tokens land
    before its outcome."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._items: list[tuple[Callable[[Any], None], Any]] = []

    def post(self, callback: Callable[[Any], None], item: Any) -> None:  # the model thread
        self._items.append((callback, item))

    def flush(self) -> None:  # the model thread, after each step
        if not self._items:
            return
        items, self._items = self._items, []
        try:
            self._loop.call_soon_threadsafe(_deliver_all, items)
        except RuntimeError:  # the event loop is closed (shutting down): nobody is waiting any more
            pass


def _deliver_all(items: list[tuple[Callable[[Any], None], Any]]) -> None:
    for callback, item in items:
        callback(item)


class Delivery:
    """What the model thread hands one waiting request: its tokens as they come (streaming requests only),
    then its result or an error. Holds at most the request's max_new_tokens tokens, and they are taken away
    at every ``take``."""

    def __init__(self, mailbox: Mailbox):
        self._mailbox = mailbox
        self._tokens: list[int] = []
        self.outcome: GenerationResult | BaseException | None = None
        self._arrived = asyncio.Event()

    # --- the model thread: in order, through the mailbox, so every token lands before the outcome ---
    def token(self, token: int) -> None:
        self._mailbox.post(self._add_token, token)

    def finish(self, result: GenerationResult) -> None:
        self._mailbox.post(self.end, result)

    def fail(self, error: BaseException) -> None:
        self._mailbox.post(self.end, error)

    # --- the event loop ---------------------------------------------------------------------------
    def _add_token(self, token: int) -> None:
        self._tokens.append(token)
        self._arrived.set()

    def end(self, outcome: GenerationResult | BaseException) -> None:
        """The first outcome wins (an abort at shutdown may come before the model thread's own)."""
        if self.outcome is None:
            self.outcome = outcome
            self._arrived.set()

    async def take(self, timeout_s: float) -> list[int]:
        """The tokens that arrived since the last call, waiting up to ``timeout_s`` for one or the outcome."""
        if not self._tokens and self.outcome is None:
            await asyncio.wait_for(self._arrived.wait(), timeout_s if timeout_s > 0 else 0)
        tokens, self._tokens = self._tokens, []
        if self.outcome is None:
            self._arrived.clear()
        return tokens


_STOP = object()


def shutdown_error() -> NotReadyError:
    """What requests still unfinished at the end of the shutdown grace period are answered."""
    return NotReadyError("the service shut down before this request finished; retry on another instance",
                         headers={"Retry-After": "5"})


class Runner:
    """Runs the model on a single dedicated thread, behind a bounded admission count.

    Admitted requests queue for that thread, whose scheduler lets them join the running batch at the next
    step. At most ``max_queue`` requests wait beyond a full set of slots; more are refused at once (503), so
    a burst sheds load instead of piling up memory and latency.
    """

    def __init__(self, max_queue: int, prefill_token_budget: int = DEFAULT_PREFILL_TOKEN_BUDGET,
                 decoding_prefill_token_budget: int = DEFAULT_DECODING_PREFILL_TOKEN_BUDGET):
        self.max_queue = max_queue
        self.prefill_budgets = (prefill_token_budget, decoding_prefill_token_budget)
        self._inbox: queue.Queue = queue.Queue()  # bounded by admission: max_queue + slots
        self.state = ModelState.loading
        self.phase: str | None = "starting"  # what the load is doing now, for /health
        self.failure_reason: str | None = None
        self.engine: Any = None
        self.scheduler: Scheduler | None = None
        self.load_time_s: float | None = None
        self._pending = 0  # admitted and not answered (event loop only)
        self._waiting = 0  # admitted and without a KV slot yet
        self._lock = threading.Lock()  # _waiting changes on both threads
        self._deliveries: dict[Delivery, Sequence] = {}  # requests waiting for the model thread's answer
        self._abort_error: BaseException | None = None
        self._mailbox: Mailbox | None = None  # made with the event loop, in load()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    @property
    def pending(self) -> int:
        """Admitted requests not answered yet."""
        return self._pending

    @property
    def queue_depth(self) -> int:
        """Admitted requests, or pages of one, without a KV slot yet (being decoded, or queued for the model)."""
        return self._waiting

    @property
    def in_flight(self) -> int:
        """Requests holding a KV slot (prefilling or decoding)."""
        return self.engine.slots_in_use if self.engine is not None else 0

    def _add_waiting(self, ticket: Ticket, change: int) -> None:
        with self._lock:
            change = max(change, -ticket._waiting)
            ticket._waiting += change
            self._waiting += change

    async def load(self, load_engine: Callable[[], Any], *alongside: Awaitable[Any]) -> None:
        """Build the engine on the model thread (and await ``alongside`` meanwhile); flip to ready or
        failed. Never raises."""
        started = time.perf_counter()
        self._mailbox = Mailbox(asyncio.get_running_loop())
        try:
            loading = asyncio.get_running_loop().run_in_executor(self._executor, load_engine)
            engine, *_ = await asyncio.gather(loading, *alongside)
        except Exception as error:  # any load failure is reported by /health, not raised
            self.failure_reason = one_line(error)
            if self.state == ModelState.loading:
                self.state = ModelState.failed
            logger.error("model load failed: %s", self.failure_reason, exc_info=not isinstance(error, ModelLoadError))
            return
        finally:
            self.phase = None
        self.engine = engine
        self.scheduler = Scheduler(engine, *self.prefill_budgets)
        self._executor.submit(self._serve)
        self.load_time_s = time.perf_counter() - started
        if self.state == ModelState.loading:
            self.state = ModelState.ready
        logger.info("model ready in %.2f s", self.load_time_s)

    def not_ready_error(self) -> NotReadyError:
        """What a request is answered while the model is not ready: 503, the state's message and Retry-After."""
        message, retry_after_s = NOT_READY[self.state]
        return NotReadyError(message.format(reason=self.failure_reason), headers={"Retry-After": str(retry_after_s)})

    def check_ready(self) -> None:
        """Raise NotReadyError unless the model is ready for work."""
        if self.state != ModelState.ready:
            raise self.not_ready_error()

    def admit(self, timeout_s: float | None = None, background: bool = False) -> Ticket:
        """Reserve a place or raise at once (503 with Retry-After): not ready, draining, or queue full."""
        self.check_ready()
        if self._pending >= self.max_queue + self.engine.max_rows:
            raise OverloadedError(
                f"too many requests in flight ({self._pending}); retry shortly",
                headers={"Retry-After": str(RETRY_AFTER_BUSY_S)},
            )
        self._pending += 1
        ticket = Ticket(self, timeout_s, background)
        with self._lock:
            self._waiting += 1
        return ticket

    async def generate(self, inputs: PreparedInputs, max_new_tokens: int, ticket: Ticket, *,
                       timeout_s: float, sampler: Any = None) -> GenerationResult:
        """Queue one sequence for the model thread and wait for its result. Past ``timeout_s``, or if the
        caller is cancelled (client disconnect), its cancel flag is set: it leaves its slot at the next step.
        ``sampler``: how it picks its tokens when not plain greedy (Engine.sampler)."""
        async with contextlib.aclosing(self._run(inputs, max_new_tokens, ticket, timeout_s, False, sampler)) as run:
            async for item in run:
                if isinstance(item, GenerationResult):
                    return item
        raise AssertionError("a generation ended without a result")  # _run always ends with one or raises

    def stream(self, inputs: PreparedInputs, max_new_tokens: int, ticket: Ticket, *,
               timeout_s: float, sampler: Any = None) -> AsyncIterator[list[int] | GenerationResult]:
        """Like ``generate``, but yields the new tokens as they come (those that arrived since the last yield,
        so a slow reader never holds up the model thread) and then the result. Closing the iterator early
        stops the generation at the next step."""
        return self._run(inputs, max_new_tokens, ticket, timeout_s, True, sampler)

    async def _run(self, inputs: PreparedInputs, max_new_tokens: int, ticket: Ticket, timeout_s: float,
                   streaming: bool, sampler: Any) -> AsyncIterator[list[int] | GenerationResult]:
        if self._abort_error is not None:
            raise self._abort_error
        loop = asyncio.get_running_loop()
        delivery = Delivery(self._mailbox)
        counted = threading.Lock()  # taken once, by whichever comes first: its start (model thread) or its end

        def left_queue() -> None:
            if counted.acquire(blocking=False):
                ticket.left_queue()

        sequence = Sequence(inputs, max_new_tokens, on_start=left_queue, on_done=delivery.finish,
                            on_error=delivery.fail, on_token=delivery.token if streaming else None,
                            background=ticket.background, sampler=sampler)
        deadline = loop.time() + timeout_s
        self._deliveries[delivery] = sequence
        self._inbox.put(sequence)
        try:
            while True:
                try:
                    tokens = await delivery.take(deadline - loop.time())
                except asyncio.TimeoutError:
                    setting = "JOB_TIMEOUT_S" if ticket.background else "REQUEST_TIMEOUT_S"
                    raise DeadlineExceededError(f"the request passed its deadline ({setting}) while "
                                                f"generating, {timeout_s:.1f} s after it was queued") from None
                if tokens:
                    yield tokens
                if isinstance(delivery.outcome, BaseException):
                    raise delivery.outcome
                if delivery.outcome is not None:
                    yield delivery.outcome
                    return
        finally:  # deadline, disconnect, error, or a reader that stopped early: free the slot at the next step
            if delivery.outcome is None:
                sequence.cancel.set()
            self._deliveries.pop(delivery, None)
            left_queue()  # if it ends without ever having had a slot, it is no longer waiting either

    def _serve(self) -> None:
        """The model thread's life after loading: take in what arrived, run one scheduler step, repeat;
        sleep on the inbox only when there is nothing to run."""
        scheduler = self.scheduler
        while True:
            arrived = [] if scheduler.has_work else [self._inbox.get()]
            while True:
                try:
                    arrived.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for item in arrived:
                if item is _STOP:
                    return
                scheduler.add(item)
            try:
                scheduler.step()
            except Exception as error:  # a bug outside the engine calls: fail what it holds, keep the thread
                logger.exception("scheduler step failed")
                scheduler.fail_all(error)
            finally:
                self._mailbox.flush()

    def begin_drain(self) -> None:
        if self.state in (ModelState.ready, ModelState.loading):
            self.state = ModelState.draining

    def abort(self, error: BaseException) -> None:
        """End of the shutdown grace: every request still waiting for the model gets ``error`` now (and so do
        those that reach it later), and its generation stops at the next step. Runs on the event loop."""
        self.begin_drain()
        self._abort_error = error
        for delivery, sequence in list(self._deliveries.items()):
            sequence.cancel.set()
            delivery.end(error)

    async def wait_idle(self, grace_s: float) -> bool:
        """Wait until no admitted request is left, up to ``grace_s``; True when idle."""
        deadline = time.monotonic() + grace_s
        while self._pending > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self._pending == 0

    def close(self) -> None:
        self._inbox.put(_STOP)
        self._executor.shutdown(wait=False, cancel_futures=True)
