"""Telling a client its job ended: the job's status JSON POSTed to the callback_url it gave, from a durable
outbox in the job store (any replica sends what is due, so a replica that dies loses no callback), retried with
backoff, and signed when JOB_CALLBACK_SECRET is set. Delivery is at least once: a receiver should treat the job id
as the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from typing import Any, Callable

import httpx

from app import SERVICE_NAME, __version__
from app.jobs.records import Job, StoreUnavailableError
from app.jobs.store import JobStore
from app.pipeline.image_source import host_allowed

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 8  # about 4 minutes of retries: 1, 2, 4, ... 64 s apart
SEND_TIMEOUT_S = 10.0
HOLD_S = 60.0  # a callback being sent is not due for other replicas for this long
IN_FLIGHT = 8


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-VLM-Signature header's value: HMAC-SHA256 over '<timestamp>.' + body (the timestamp is signed too,
    so a captured callback cannot be replayed later under a fresh one)."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def backoff_s(attempts_done: int) -> float | None:
    """Seconds until the next try after ``attempts_done`` failed ones; None: give up."""
    return None if attempts_done >= MAX_ATTEMPTS else float(2 ** (attempts_done - 1))


class CallbackSender:
    def __init__(self, store: JobStore, allowed_hosts: frozenset[str], secret: str | None,
                 describe: Callable[[Job], dict[str, Any]]):
        self.store, self.allowed_hosts, self.secret, self.describe = store, allowed_hosts, secret, describe
        self._tasks: set[asyncio.Task] = set()
        self._client = httpx.AsyncClient(timeout=SEND_TIMEOUT_S, follow_redirects=False,
                                         headers={"User-Agent": f"{SERVICE_NAME}/{__version__}"})

    async def send_due(self) -> None:
        """Start sending the callbacks that are due (at most IN_FLIGHT at once); returns without waiting."""
        room = IN_FLIGHT - len(self._tasks)
        if room <= 0:
            return
        for job in await self.store.due_callbacks(room, HOLD_S):
            task = asyncio.create_task(self._send(job), name=f"callback-{job.id[:8]}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, job: Job) -> None:
        url = job.callback_url or ""
        delivered, why = False, ""
        if not host_allowed(url, self.allowed_hosts):  # the list may have changed since the job was submitted
            why = "its host is no longer in JOB_CALLBACK_HOSTS"
            attempts_left = False
        else:
            attempts_left = True
            body = json.dumps(self.describe(job), ensure_ascii=False).encode()
            timestamp = str(int(time.time()))
            headers = {"Content-Type": "application/json", "X-VLM-Job-Id": job.id, "X-VLM-Timestamp": timestamp}
            if self.secret:
                headers["X-VLM-Signature"] = sign(self.secret, timestamp, body)
            try:
                # One bound for the whole exchange (httpx's timeout is per phase: a receiver that drips could hold
                # it past HOLD_S, and the callback would be sent twice at once); the answer's body is never read.
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    async with self._client.stream("POST", url, content=body, headers=headers) as response:
                        delivered = 200 <= response.status_code < 300
                        why = f"it answered {response.status_code}"
            except TimeoutError:
                why = f"no answer within {SEND_TIMEOUT_S:g} s"
            except (httpx.HTTPError, httpx.InvalidURL) as error:
                why = f"{type(error).__name__}: {error}"
        retry_in = backoff_s(job.callback_attempts + 1) if attempts_left and not delivered else None
        if not delivered:
            logger.warning("job %s: callback not delivered (%s); %s", job.id[:8], why,
                           f"trying again in {retry_in:.0f} s" if retry_in is not None else "giving up")
        with contextlib.suppress(StoreUnavailableError):  # still held: due again once HOLD_S has passed
            await self.store.callback_tried(job.id, delivered, retry_in)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()
