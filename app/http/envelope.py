"""One error envelope for every failure: {"error": {"type", "message", "request_id"}}; under /v1/ the same
errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, which its SDKs read."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import (DeadlineExceededError, InvalidImageError, InvalidRequestError, MethodNotAllowedError,
                        MissingFieldError, NoTableError, NotFoundError, NotReadyError, PayloadTooLargeError,
                        ServiceError, UnauthorizedError, UnsupportedMediaError, UploadTimeoutError)
from app.http.access_log import note
from app.request_context import current_request_id
from app.service.schemas import ErrorResponse

logger = logging.getLogger(__name__)

_DESCRIPTIONS = {
    400: "Invalid input: undecodable image, unreadable PDF, a file over DECODE_TIMEOUT_S to decode, a shape the model "
         "cannot take, bad form or query value",
    401: "Missing or wrong API key",
    404: "No such route",
    408: "The upload did not arrive in full within UPLOAD_TIMEOUT_S",
    413: "Upload over MAX_UPLOAD_MB, or image over the decoded-pixel limit",
    415: "Not an accepted image/PDF format",
    422: "A required form field is missing; or format=markdown/csv and the answer holds no table",
    500: "Internal error (details in the service log, under the request id)",
    503: "Model not ready, draining or shut down mid-request, too many uploads, or the wait queue is full "
         "(see Retry-After)",
    504: "The request passed its deadline (REQUEST_TIMEOUT_S)",
}


# One typical error per status for Swagger's examples; a route group passes its own where its usual one differs.
_EXAMPLES: dict[int, ServiceError] = {
    400: InvalidImageError("cannot decode the upload as an image (cannot identify image file)"),
    401: UnauthorizedError(),
    404: NotFoundError("no route GET /infr; see /docs"),
    405: MethodNotAllowedError("GET is not allowed on /infer; see /docs"),
    408: UploadTimeoutError("the upload did not arrive within UPLOAD_TIMEOUT_S=60 s (1048576 bytes received)"),
    413: PayloadTooLargeError("upload over MAX_UPLOAD_MB (20 MB)"),
    415: UnsupportedMediaError("not an accepted format: send PNG, JPEG, WebP, GIF, BMP, TIFF, PDF, SVG or BPMN"),
    422: NoTableError("the answer holds no table (no markdown table in the answer); ask for format=json to see it"),
    500: ServiceError(),
    503: NotReadyError("the model is still loading; retry shortly", headers={"Retry-After": "5"}),
    504: DeadlineExceededError("the request passed REQUEST_TIMEOUT_S (120 s)"),
}
_EXAMPLE_REQUEST_ID = "7cd29e04fd024ceea1fd842cab134ff3"

OPENAI_PREFIX = "/v1/"
_OPENAI_TYPES = {401: "authentication_error", 404: "not_found_error"}


def error_responses(*status_codes: int, model: type = ErrorResponse, descriptions: dict[int, str] | None = None,
                    examples: dict[int, ServiceError] | None = None) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entry documenting these statuses with the envelope schema (``model``: ErrorResponse, or
    OpenAIErrorResponse for /v1) and an example of each that has the status's own type and message."""
    described = {**_DESCRIPTIONS, **(descriptions or {})}
    shown = {**_EXAMPLES, **(examples or {})}
    render = openai_error if model is not ErrorResponse else _example_envelope
    return {code: {"model": model, "description": described[code],
                   "content": {"application/json": {"example": render(shown[code])}}}
            for code in status_codes}


def _example_envelope(error: ServiceError) -> dict[str, Any]:
    example = envelope(error)
    example["error"]["request_id"] = _EXAMPLE_REQUEST_ID
    return example


def envelope(error: ServiceError) -> dict[str, Any]:
    return {"error": {"type": error.error_type, "message": error.message, "request_id": current_request_id()}}


def openai_error(error: ServiceError) -> dict[str, Any]:
    """OpenAI's error object: its type is the broad class its SDKs know, code is this service's error type."""
    kind = "server_error" if error.status_code >= 500 else _OPENAI_TYPES.get(error.status_code,
                                                                              "invalid_request_error")
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.error_type}}


def error_response(error: ServiceError, path: str = "") -> JSONResponse:
    note(error_type=error.error_type)
    body = openai_error(error) if path.startswith(OPENAI_PREFIX) else envelope(error)
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


def _describe_validation(exc: RequestValidationError) -> ServiceError:
    problems = list(exc.errors())
    missing = [str(p["loc"][-1]) for p in problems if p.get("type") == "missing"]
    if missing:
        return MissingFieldError(f"required multipart form field missing: {', '.join(missing)}")
    details = "; ".join(_problem(p) for p in problems)
    return InvalidRequestError(f"invalid value - {details}")


def _problem(problem: dict[str, Any]) -> str:
    field = problem["loc"][-1]
    if "UploadFile" in str(problem.get("msg", "")):  # pydantic's words name a class, not what to send
        return (f"{field}: send the diagram as a file part (with a filename), not a text field; with curl, "
                f"-F {field}=@diagram.png")
    return f"{field}: {problem['msg']}"


class EnvelopedRoute(APIRoute):
    """Turns a handler's unexpected exception into the 500 envelope while the request is still in scope.

    Starlette hands handlers for ``Exception`` to its outermost middleware, after the request-id and access-log
    middlewares have finished: the log line and the body would lose the request id the message points to."""

    def get_route_handler(self) -> Any:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Any:
            try:
                return await handler(request)
            except (ServiceError, StarletteHTTPException, RequestValidationError):
                raise
            except Exception:
                logger.exception("unhandled error on %s %s", request.method, request.url.path)
                raise ServiceError() from None

        return handle


def _documented_methods(request: Request) -> list[str]:
    """Every documented method on this path. Starlette's Allow names only the first route the path matched,
    and a path served by several routes (GET and DELETE /jobs/{id}) would lose the others."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, request.url.path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_describe_validation(exc), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        mapped: ServiceError
        if exc.status_code == 404:
            mapped = NotFoundError(f"no route {request.method} {request.url.path}; see /docs")
        elif exc.status_code == 405:
            allowed = _documented_methods(request)
            headers = {"Allow": ", ".join(allowed)} if allowed else dict(exc.headers or {})
            mapped = MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path}; see /docs",
                                           headers=headers)
        else:
            mapped = InvalidRequestError(str(exc.detail))
            mapped.status_code = exc.status_code if 400 <= exc.status_code < 500 else 400
        return error_response(mapped, request.url.path)

    @app.exception_handler(Exception)  # last resort, for errors outside the routes (see EnvelopedRoute)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(ServiceError(), request.url.path)
