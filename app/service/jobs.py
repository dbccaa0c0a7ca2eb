"""Long work as jobs: accepted at once, run when the model has room, kept until fetched or expired.

A job runs exactly like an /infer request (the same admission, batching and deadline, counted from when it
starts), so jobs and synchronous calls share the model fairly. The store survives restarts: a job cut off by
one runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any, Awaitable, Callable

from app.errors import NotReadyError, OverloadedError, ServiceError
from app.metrics import Metrics
from app.request_context import request_id_var
from app.service.job_store import UNFINISHED, Job, JobStore, StoreFullError
from app.service.runner import ModelState, Runner, Ticket
from app.service.schemas import InferResponse

logger = logging.getLogger(__name__)

TICK_S = 1.0  # how often the worker looks for work, cancellations and expired results


Progress = Callable[[int, int], Awaitable[None]]  # (pages done, pages in all): how far a running job got
Infer = Callable[[bytes, dict[str, Any], Ticket, Progress], Awaitable[InferResponse]]


class JobQueue:
    def __init__(self, store: JobStore, runner: Runner, infer: Infer, metrics: Metrics, *, ttl_s: float,
                 max_jobs: int, concurrency: int, timeout_s: float, stale_after_s: float):
        self.store = store
        self.runner = runner
        self.infer = infer  # runs one job's request, exactly as /infer would
        self.metrics = metrics
        self.timeout_s = timeout_s  # a job's deadline, from its start: longer than a synchronous request's
        self.stale_after_s = stale_after_s
        self.ttl_s = ttl_s
        self.max_jobs = max_jobs
        self.concurrency = concurrency
        self.owner = socket.gethostname()
        self._running: dict[str, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._stopping = False
        self.counts = dict.fromkeys(("queued", "running", "done", "failed", "cancelled"), 0)  # as last read

    # --- the routes ---------------------------------------------------------------------------------
    async def submit(self, params: dict[str, Any], data: bytes) -> str:
        try:
            job_id = await asyncio.to_thread(self.store.add, params, data, self.max_jobs)
        except StoreFullError as full:
            raise OverloadedError(f"{full.unfinished} jobs queued or running (MAX_JOBS={self.max_jobs}); retry "
                                  "later", headers={"Retry-After": "30"}) from None
        await self._refresh()
        self._wake.set()
        return job_id

    async def get(self, job_id: str) -> Job | None:
        return await asyncio.to_thread(self.store.get, job_id)

    async def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job (True), which then never reaches the model or stops at its next step."""
        cancelled = await asyncio.to_thread(self.store.finish, job_id, "cancelled")
        task = self._running.get(job_id)
        if task is not None:
            task.cancel()
        await self._refresh()
        return cancelled

    async def forget(self, job_id: str) -> None:
        await asyncio.to_thread(self.store.forget, job_id)
        await self._refresh()

    async def _refresh(self) -> None:
        """Re-read the counts behind /health and the vlm_jobs gauge after every change."""
        self.counts = await asyncio.to_thread(self.store.counts)
        for status, count in self.counts.items():
            self.metrics.jobs.labels(status).set(count)

    # --- the worker ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._worker = asyncio.create_task(self._work(), name="jobs")

    async def stop(self) -> None:
        """Stop taking work; jobs still running are left to run again after the restart."""
        self._stopping = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def _work(self) -> None:
        requeued = await asyncio.to_thread(self.store.requeue_abandoned, self.owner, self.stale_after_s)
        if requeued:
            logger.info("%d job(s) cut off by a restart queued again", requeued)
        while True:
            try:
                await self._tick()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the worker
                logger.exception("job worker tick failed")
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)

    async def _tick(self) -> None:
        await asyncio.to_thread(self.store.expire, self.ttl_s)
        await self._refresh()
        # A job cancelled through another replica sharing the store stops here too.
        statuses = await asyncio.to_thread(self.store.statuses, list(self._running))
        for job_id, status in statuses.items():
            if status not in UNFINISHED:
                self._running[job_id].cancel()
        while self.runner.state == ModelState.ready and len(self._running) < self.concurrency:
            claimed = await asyncio.to_thread(self.store.claim_next, self.owner)
            if claimed is None:
                return
            job_id, params, data = claimed
            task = asyncio.create_task(self._run(job_id, params, data), name=f"job-{job_id[:8]}")
            self._running[job_id] = task
            task.add_done_callback(lambda _, job_id=job_id: self._running.pop(job_id, None))
        await self._refresh()

    async def _run(self, job_id: str, params: dict[str, Any], data: bytes) -> None:
        request_id_var.set(f"job-{job_id[:12]}")  # this task's log lines and answer carry the job
        try:
            ticket = self.runner.admit(self.timeout_s)
        except (OverloadedError, NotReadyError):  # the model is full: the job waits its turn in the store
            await asyncio.to_thread(self.store.requeue, job_id)
            return
        started = time.perf_counter()

        async def progress(done: int, total: int) -> None:
            await asyncio.to_thread(self.store.progress, job_id, done, total)

        try:
            response = await self.infer(data, params, ticket, progress)
        except asyncio.CancelledError:
            if self._stopping:  # shutting down: the job runs again after the restart
                await asyncio.to_thread(self.store.requeue, job_id)
            else:  # cancelled by DELETE (already marked) or through another replica
                await asyncio.to_thread(self.store.finish, job_id, "cancelled")
            raise
        except ServiceError as error:
            if self.runner.state == ModelState.draining:  # cut off by the shutdown, not by its file
                await asyncio.to_thread(self.store.requeue, job_id)
                return
            await self._end(job_id, "failed", started, error=_error(error))
        except Exception:  # noqa: BLE001 - a bug or device error fails the job, not the worker
            logger.exception("job %s failed", job_id[:8])
            await self._end(job_id, "failed", started, error=_error(ServiceError()))
        else:
            await self._end(job_id, "done", started, result=response.model_dump(mode="json"))
        finally:
            ticket.release()

    async def _end(self, job_id: str, status: str, started: float, **outcome: Any) -> None:
        await asyncio.to_thread(self.store.finish, job_id, status, **outcome)
        self.metrics.job_duration.labels(status).observe(time.perf_counter() - started)
        await self._refresh()


def _error(error: ServiceError) -> dict[str, Any]:
    return {"status": error.status_code, "type": error.error_type, "message": error.message}
