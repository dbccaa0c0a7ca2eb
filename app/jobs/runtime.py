"""One replica's job machinery, put together from the settings: the store, the worker that runs jobs on the model
service, the callbacks, and the service the routes call. The application's lifespan starts and stops it beside
the model service; neither knows the other's insides."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from app.jobs.callbacks import CallbackSender
from app.jobs.service import JobService
from app.jobs.status import job_status
from app.jobs.store import JobStore, open_database
from app.jobs.worker import Infer, JobWorker, instance_id
from app.metrics import Metrics
from app.pipeline.image_source import parse_hosts
from app.service.runner import Runner
from app.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobsHealth:
    store: str  # sqlite | postgresql
    store_error: str | None  # why the job routes answer 503 now; None when the store answers
    queued: int
    running: int
    running_here: int


class JobSystem:
    def __init__(self, settings: Settings, runner: Runner, infer: Infer, metrics: Metrics):
        self.store = JobStore(open_database(settings.jobs_db, settings.job_store_timeout_s),
                              settings.job_store_timeout_s)
        self.owner = instance_id()
        callbacks = CallbackSender(self.store, parse_hosts(settings.job_callback_hosts), settings.job_callback_secret,
                                   lambda job: job_status(job).model_dump(mode="json"))
        concurrency = settings.job_concurrency
        if concurrency is None:
            concurrency = settings.max_batch_size or 8
        self.worker = JobWorker(
            self.store, runner, infer, metrics, owner=self.owner, concurrency=concurrency,
            lease_s=settings.job_lease_s, max_attempts=settings.max_job_attempts, timeout_s=settings.job_timeout_s,
            ttl_s=settings.job_ttl_s, max_result_bytes=int(settings.max_result_mb * 2 ** 20), callbacks=callbacks)
        self.service = JobService(self.store, self.worker, max_jobs=settings.max_jobs,
                                  callback_hosts=parse_hosts(settings.job_callback_hosts))
        self.worker.on_end = self.service.ended

    async def start(self) -> None:
        """Open the store (bounded: a store that is down does not hold up the service, the worker keeps trying)
        and start the worker, which claims jobs once the model is ready."""
        await self.worker.open_store()
        self.worker.start()

    async def stop(self) -> None:
        await self.service.close()
        await self.worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.store.close(), 5)

    def health(self) -> JobsHealth:
        counts = self.worker.counts
        return JobsHealth(store=self.store.kind, store_error=self.worker.store_down, queued=counts["queued"],
                          running=counts["running"], running_here=self.worker.running)
