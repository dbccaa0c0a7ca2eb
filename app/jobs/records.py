"""What the job store hands out: plain values, no database types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STATUSES = ("queued", "running", "done", "failed", "cancelled")
UNFINISHED = ("queued", "running")


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    params: dict[str, Any]
    created_at: float
    started_at: float | None
    finished_at: float | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    pages_done: int | None = None
    pages_total: int | None = None
    attempts: int = 0
    callback_url: str | None = None
    callback_status: str | None = None  # pending | delivered | failed, once the job has ended
    callback_attempts: int = 0

    @property
    def ended(self) -> bool:
        return self.status not in UNFINISHED


@dataclass(frozen=True)
class Claim:
    """A job this replica now holds: its inputs, and the attempt number that fences its result write."""

    id: str
    params: dict[str, Any]
    file: bytes
    attempt: int


class StoreFullError(Exception):
    def __init__(self, unfinished: int):
        super().__init__(f"{unfinished} jobs queued or running")
        self.unfinished = unfinished


class StoreUnavailableError(Exception):
    """The store could not be opened, reached, or did not answer in time; the message is one line."""
