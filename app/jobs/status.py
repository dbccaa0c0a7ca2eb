"""A job as its clients see it: the body of GET /jobs/{id}, and of its callback."""

from __future__ import annotations

from app.jobs.records import Job
from app.service.schemas import CallbackInfo, ErrorBody, JobProgress, JobStatus


def job_status(job: Job, prefix: str = "") -> JobStatus:
    """``prefix``: the path the routes are mounted under (a proxy's root path), so the URLs work as given."""
    error = job.error
    return JobStatus(
        id=job.id, status=job.status, status_url=f"{prefix}/jobs/{job.id}",
        result_url=f"{prefix}/jobs/{job.id}/result", created_at=job.created_at, started_at=job.started_at,
        finished_at=job.finished_at,
        progress=JobProgress(pages_done=job.pages_done or 0, pages_total=job.pages_total)
        if job.pages_total is not None else None,
        error=ErrorBody(type=error["type"], message=error["message"], request_id=f"job-{job.id[:12]}")
        if error else None,
        callback=CallbackInfo(url=job.callback_url, status=job.callback_status, attempts=job.callback_attempts)
        if job.callback_url else None)
