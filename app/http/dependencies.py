"""What route handlers receive besides the request: the service, from the app's state (never a module global)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.service.inference import InferenceService


def get_service(request: Request) -> InferenceService:
    return request.app.state.service


ServiceDep = Annotated[InferenceService, Depends(get_service)]
