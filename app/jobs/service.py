"""What the job routes call: submit, read (optionally waiting for the end), cancel and forget, all against the
shared store, so any replica answers for any job; each call bounded by JOB_STORE_TIMEOUT_S."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from app.errors import InvalidRequestError, JobStoreUnavailableError, OverloadedError
from app.jobs.records import Job, StoreFullError, StoreUnavailableError
from app.jobs.store import JobStore
from app.jobs.worker import JobWorker
from app.pipeline.image_source import host_allowed

MAX_WAIT_S = 60.0
WATCH_EVERY_S = 0.5  # how often waiting long-polls look for ends that happened on other replicas
MAX_WATCHED = 1000  # long-polls waiting at once; beyond it a long-poll answers at once (still correct, just short)
MAX_CALLBACK_URL = 2048


class JobService:
    def __init__(self, store: JobStore, worker: JobWorker, *, max_jobs: int, callback_hosts: frozenset[str]):
        self.store, self.worker = store, worker
        self.max_jobs = max_jobs
        self.callback_hosts = callback_hosts
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._watch: asyncio.Task | None = None

    async def _call(self, operation, *args: Any) -> Any:
        try:
            return await operation(*args)
        except StoreUnavailableError as error:
            raise JobStoreUnavailableError(
                f"the job store is unavailable ({self.store.kind}: {error}); /infer still answers",
                headers={"Retry-After": "5"}) from None

    def check_callback(self, url: str) -> None:
        """A callback_url the service may POST to, or 400 saying why not."""
        if len(url) > MAX_CALLBACK_URL:
            raise InvalidRequestError(f"callback_url is longer than {MAX_CALLBACK_URL} characters",
                                      param="callback_url")
        if not self.callback_hosts:
            raise InvalidRequestError("this service sends no callbacks (JOB_CALLBACK_HOSTS is empty); poll the "
                                      "job, or wait on it with GET /jobs/{id}?wait=N", param="callback_url")
        if not host_allowed(url, self.callback_hosts):
            raise InvalidRequestError("callback_url must be an http(s) URL on a host listed in JOB_CALLBACK_HOSTS",
                                      param="callback_url")

    async def submit(self, params: dict[str, Any], data: bytes, callback_url: str | None = None) -> Job:
        if callback_url:
            self.check_callback(callback_url)
        try:
            job = await self._call(self.store.add, params, data, self.max_jobs, callback_url or None)
        except StoreFullError as full:
            raise OverloadedError(f"{full.unfinished} jobs queued or running (MAX_JOBS={self.max_jobs}); retry "
                                  "later", headers={"Retry-After": "30"}) from None
        await self.worker.refresh_quietly()
        self.worker.wake()
        return job

    async def get(self, job_id: str, wait_s: float = 0.0) -> Job | None:
        """The job; with ``wait_s``, once it has ended or ``wait_s`` has passed, whichever comes first."""
        job = await self._call(self.store.get, job_id)
        if job is None or job.ended or wait_s <= 0 or sum(map(len, self._waiters.values())) >= MAX_WATCHED:
            return job
        ended = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(ended)
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watch_ends(), name="jobs-long-poll")
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ended.wait(), min(wait_s, MAX_WAIT_S))
        finally:
            waiting = self._waiters.get(job_id)
            if waiting is not None:
                waiting.discard(ended)
                if not waiting:
                    del self._waiters[job_id]
        return await self._call(self.store.get, job_id)

    def ended(self, job_id: str) -> None:
        """A job ended here: its long-polls answer now."""
        for event in self._waiters.get(job_id, ()):
            event.set()

    async def _watch_ends(self) -> None:
        """One query for all waiting long-polls, whatever their number, while any wait."""
        while self._waiters:
            await asyncio.sleep(WATCH_EVERY_S)
            with contextlib.suppress(StoreUnavailableError):
                statuses = await self.store.statuses(list(self._waiters))
                for job_id in list(self._waiters):
                    if statuses.get(job_id) not in ("queued", "running"):  # ended, or forgotten meanwhile
                        self.ended(job_id)

    async def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued or running job (the cancelled job), or None when it had already ended. Its replica
        stops it at once if that is this one, else at its next heartbeat."""
        job = await self._call(self.store.cancel, job_id)
        if job is not None:
            self.worker.stop_local(job_id)
            self.ended(job_id)
            await self.worker.refresh_quietly()
        return job

    async def forget(self, job_id: str) -> str:
        """"forgotten", "callback pending" or "none" (see JobStore.forget)."""
        forgotten = await self._call(self.store.forget, job_id)
        if forgotten == "forgotten":
            await self.worker.refresh_quietly()
        return forgotten

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for job_id in list(self._waiters):
            self.ended(job_id)
