"""The job worker of one replica: claims jobs under a lease, runs each exactly like an /infer request (the same
admission and batching, as background work that synchronous requests overtake), renews its leases every tick,
and writes each end once, fenced by its claim.

A job this replica loses (cancelled or forgotten through any replica, or claimed again after its lease passed
while the store was out of reach) is stopped at the next tick, and its result, if it still comes, is discarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from app.errors import NotReadyError, OverloadedError, ServiceError
from app.jobs.callbacks import CallbackSender
from app.jobs.records import STATUSES, Claim, StoreUnavailableError
from app.jobs.store import JobStore
from app.metrics import Metrics
from app.request_context import request_id_var
from app.service.runner import ModelState, Runner, Ticket
from app.service.schemas import InferResponse

logger = logging.getLogger(__name__)

TICK_S = 1.0  # how often the worker renews its leases and looks for work, cancellations and expired results
REOPEN_S = 5.0  # how often a store that could not be opened is tried again
EXPIRE_EVERY_S = 60.0
RETRY_WRITE_S = (1.0, 2.0, 5.0, 10.0)  # a job's end that could not be written is tried again at these gaps

Progress = Callable[[int, int], Awaitable[None]]  # (pages done, pages in all): how far a running job got
Infer = Callable[[bytes, dict[str, Any], Ticket, Progress], Awaitable[InferResponse]]


def instance_id() -> str:
    """Unique to this process: two processes on one host (or a restarted one) never share leases."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class _Running:
    claim: Claim
    task: asyncio.Task
    lost: bool = False  # the store says another owner, a cancel or a forget has the job now
    written: bool = False  # its end is in the store: a heartbeat that no longer finds it running is no news


class JobWorker:
    def __init__(self, store: JobStore, runner: Runner, infer: Infer, metrics: Metrics, *, owner: str,
                 concurrency: int, lease_s: float, max_attempts: int, timeout_s: float, ttl_s: float,
                 max_result_bytes: int, callbacks: CallbackSender | None = None,
                 on_end: Callable[[str], None] = lambda job_id: None):
        self.store, self.runner, self.infer, self.metrics = store, runner, infer, metrics
        self.owner = owner
        self.concurrency = concurrency
        self.lease_s, self.max_attempts = lease_s, max_attempts
        self.timeout_s = timeout_s  # a job's deadline, from its start: longer than a synchronous request's
        self.ttl_s = ttl_s
        self.max_result_bytes = max_result_bytes
        self.callbacks = callbacks
        self.on_end = on_end  # a job this replica ended: long-polls waiting on it answer at once
        self.counts = dict.fromkeys(STATUSES, 0)  # the store's, as last read: /health and vlm_jobs
        self._running: dict[str, _Running] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        self._expired_at = 0.0
        self.store_down: str | None = None  # why the last tick could not reach the store

    @property
    def running(self) -> int:
        return len(self._running)

    def wake(self) -> None:
        """Look for work now (a job was just submitted here) instead of at the next tick."""
        self._wake.set()

    def stop_local(self, job_id: str) -> None:
        """A job cancelled through this replica: stop its generation now, not at the next tick."""
        running = self._running.get(job_id)
        if running is not None:
            running.lost = True
            running.task.cancel()

    # --- life ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._work(), name="jobs")

    async def stop(self) -> None:
        """Stop taking work; jobs still running here are given back to the queue for any replica."""
        self._stopping = True
        if self._loop_task is not None:
            # Let the tick in progress end by itself: cancelled inside a claim, the claim could commit with no
            # task to run its job. Only a tick stuck past the store's own bound is cancelled.
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._loop_task), self.store.timeout_s * 2 + 1)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._loop_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._loop_task
        for running in list(self._running.values()):
            running.task.cancel()
        await asyncio.gather(*(running.task for running in self._running.values()), return_exceptions=True)
        with contextlib.suppress(StoreUnavailableError):  # else their leases pass and any replica takes them
            given_back = await self.store.give_back_all(self.owner)
            if given_back:
                logger.info("%d job(s) this replica was running went back to the queue", given_back)
        if self.callbacks is not None:
            await self.callbacks.stop()

    async def _work(self) -> None:
        while not self._stopping:
            if not self.store.available:
                await self.open_store()
            else:
                try:
                    await self._tick()
                    self._store_back()
                except StoreUnavailableError as error:
                    self._store_down(str(error))
                except Exception:  # noqa: BLE001 - a bug in one tick must not end the worker
                    logger.exception("job worker tick failed")
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S if self.store.available else REOPEN_S)

    async def open_store(self) -> None:
        """Open the store, or log (once per outage) why it cannot be."""
        try:
            await self.store.open()
        except StoreUnavailableError as error:
            self._store_down(f"could not be opened: {error}")
            self.metrics.job_store_up.set(0)
            return
        logger.info("job store open: %s (%s); this replica's jobs run as %s", self.store.label, self.store.kind,
                    self.owner)
        self._store_back()
        with contextlib.suppress(StoreUnavailableError):
            await self.refresh()

    def _store_down(self, why: str) -> None:
        if self.store_down is None:  # one line per outage, not one per tick
            logger.error("job store unavailable (JOBS_DB=%s): %s; /infer is not affected, the job routes answer "
                         "503 until it is back", self.store.label, why)
        self.store_down = why
        self.metrics.job_store_up.set(0)

    def _store_back(self) -> None:
        if self.store_down is not None:
            logger.info("job store available again (JOBS_DB=%s)", self.store.label)
        self.store_down = None
        self.metrics.job_store_up.set(1)

    async def _tick(self) -> None:
        if self._running:
            held = await self.store.heartbeat(self.owner, list(self._running), self.lease_s)
            for job_id, running in list(self._running.items()):
                if job_id not in held and not running.lost and not running.written:
                    logger.info("job %s is no longer this replica's (cancelled, forgotten, or claimed again after "
                                "its lease passed): stopping it", job_id[:8])
                    running.lost = True
                    running.task.cancel()
        while (self.runner.state == ModelState.ready and len(self._running) < self.concurrency
               and not self._stopping):
            claim = await self.store.claim(self.owner, self.lease_s, self.max_attempts)
            if claim is None:
                break
            earlier = self._running.get(claim.id)
            if earlier is not None:  # this replica's own earlier claim, whose lease passed while the store was away
                earlier.lost = True
                earlier.task.cancel()
            task = asyncio.create_task(self._run(claim), name=f"job-{claim.id[:8]}")
            self._running[claim.id] = _Running(claim, task)
            task.add_done_callback(self._forget_task)
        now = time.monotonic()
        if now - self._expired_at > min(EXPIRE_EVERY_S, self.ttl_s / 4):
            self._expired_at = now
            await self.store.expire(self.ttl_s)
        await self.refresh()
        if self.callbacks is not None:
            await self.callbacks.send_due()

    async def refresh(self) -> None:
        """Re-read the store's counts behind /health and the vlm_jobs gauge."""
        self.counts = await self.store.counts()
        for status, count in self.counts.items():
            self.metrics.jobs.labels(status, self.store.label).set(count)

    async def refresh_quietly(self) -> None:
        """After a change: /health and vlm_jobs show it now, not at the next tick (which retries if this fails)."""
        with contextlib.suppress(StoreUnavailableError):
            await self.refresh()

    # --- one job ------------------------------------------------------------------------------------
    async def _run(self, claim: Claim) -> None:
        request_id_var.set(f"job-{claim.id[:12]}")  # this task's log lines and answer carry the job
        if claim.attempt > 1:
            logger.info("job %s: attempt %d of %d (its replica was lost before)", claim.id[:8], claim.attempt,
                        self.max_attempts)
        try:
            ticket = self.runner.admit(self.timeout_s, background=True)
        except (OverloadedError, NotReadyError):  # the model is full: the job waits its turn in the store
            await self._give_back(claim)
            return
        started = time.perf_counter()

        async def progress(done: int, total: int) -> None:
            with contextlib.suppress(StoreUnavailableError):  # progress is a courtesy; the end is what counts
                await self.store.progress(claim.id, self.owner, done, total)

        outcome: dict[str, Any]
        try:
            try:
                response = await self.infer(claim.file, claim.params, ticket, progress)
            finally:
                ticket.release()  # the model's part is over: writing the end must not hold an admission place
        except asyncio.CancelledError:
            if self._stopping and not self._lost(claim):  # shutting down: any replica runs it again
                await self._give_back(claim)
            raise
        except ServiceError as error:
            # By the shutdown, not by its file; or the service is busy (e.g. JSON schemas waiting to compile):
            # the job waits its turn in the store, as when the model is full.
            if self._cut_off() or isinstance(error, OverloadedError):
                await self._give_back(claim)
                return
            status, outcome = "failed", {"error": _error(error)}
        except Exception:  # noqa: BLE001 - a bug or device error fails the job, not the worker
            logger.exception("job %s failed", claim.id[:8])
            status, outcome = "failed", {"error": _error(ServiceError())}
        else:
            if self._cut_off() and any(page.error is not None for page in response.pages or []):
                # Pages the shutdown cut off are not the file's failure: the whole job runs again elsewhere.
                await self._give_back(claim)
                return
            result = json.dumps(response.model_dump(mode="json"), ensure_ascii=False)
            if len(result.encode()) > self.max_result_bytes:
                status, outcome = "failed", {"error": {
                    "status": 413, "type": "payload_too_large",
                    "message": f"the answer is {len(result.encode()) / 2 ** 20:.1f} MiB, over MAX_RESULT_MB "
                               f"({self.max_result_bytes / 2 ** 20:g} MiB): ask for fewer pages"}}
            else:
                status, outcome = "done", {"result": result}
        await self._end(claim, status, started, **outcome)

    def _cut_off(self) -> bool:
        return self._stopping or self.runner.state == ModelState.draining

    def _lost(self, claim: Claim) -> bool:
        running = self._running.get(claim.id)
        return running is None or running.claim is not claim or running.lost

    def _forget_task(self, task: asyncio.Task) -> None:
        for job_id, running in list(self._running.items()):
            if running.task is task:
                del self._running[job_id]

    async def _give_back(self, claim: Claim) -> None:
        with contextlib.suppress(StoreUnavailableError):  # its lease passes and any replica claims it again
            await self.store.give_back(claim, self.owner)

    async def _end(self, claim: Claim, status: str, started: float, **outcome: Any) -> None:
        """Write the job's end, retrying while the store is out of reach, as long as this replica holds the job
        (its heartbeat keeps the lease while the store answers that); a lost job's outcome is discarded."""
        for attempt in range(len(RETRY_WRITE_S) * 100):
            if self._lost(claim):
                break
            try:
                written = await self.store.finish(claim, self.owner, status, **outcome)
            except StoreUnavailableError as error:
                if self._stopping:
                    logger.warning("job %s: its end could not be written before shutdown (%s); it goes back to "
                                   "the queue (or, with the store away, runs again once its lease passes)",
                                   claim.id[:8], error)
                    return
                gap = RETRY_WRITE_S[min(attempt, len(RETRY_WRITE_S) - 1)]
                logger.warning("job %s: its end could not be written (%s); trying again in %.0f s", claim.id[:8],
                               error, gap)
                await asyncio.sleep(gap)
                continue
            if written:
                running = self._running.get(claim.id)
                if running is not None and running.claim is claim:
                    running.written = True
                self.metrics.job_duration.labels(status).observe(time.perf_counter() - started)
                self.on_end(claim.id)
                await self.refresh_quietly()
                self.wake()  # a place is free: claim the next job now
                return
            break
        else:
            logger.error("job %s: its end could not be written for over an hour; it runs again once its lease "
                         "passes", claim.id[:8])
            return
        self.metrics.job_results_discarded.inc()
        logger.warning("job %s: this replica no longer holds it (cancelled, forgotten or claimed again); its "
                       "outcome (%s) is discarded", claim.id[:8], status)


def _error(error: ServiceError) -> dict[str, Any]:
    return {"status": error.status_code, "type": error.error_type, "message": error.message}
