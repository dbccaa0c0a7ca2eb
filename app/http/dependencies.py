"""What route handlers receive besides the request: the model service and the job system, from the app's state
(never module globals)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.jobs.runtime import JobSystem
from app.service.inference import InferenceService


def get_service(request: Request) -> InferenceService:
    return request.app.state.service


ServiceDep = Annotated[InferenceService, Depends(get_service)]


def get_jobs(request: Request) -> JobSystem:
    return request.app.state.jobs


JobsDep = Annotated[JobSystem, Depends(get_jobs)]
