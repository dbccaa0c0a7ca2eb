"""HTTP routes of the job API: submit a diagram as a job (202 at once), poll it, fetch its result, cancel it.
For work longer than a client, proxy or REQUEST_TIMEOUT_S waits."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse

from app.errors import (
    InvalidRequestError,
    JobNotDoneError,
    JobNotFoundError,
    JobStoreUnavailableError,
    NoTableError,
    UnsupportedMediaError,
    recorded_error,
)
from app.http.dependencies import JobsDep, ServiceDep
from app.http.envelope import EnvelopedRoute, error_responses
from app.http.routes import (INFER_FIELDS, TABLE_FORMATS, check_form_parts, check_table_format, json_format_field,
                             pages_asked)
from app.model.grammar import MAX_SCHEMA_CHARS
from app.pipeline.bpmn import looks_like_bpmn
from app.pipeline.imaging import ACCEPTED_TEXT, UNSUPPORTED_FILE, sniff_format
from app.pipeline.pages import first_page
from app.service.chat_schemas import PROMPT_MAX_CHARS
from app.service.inference import BPMN_TAKES_NO_SCHEMA, check_bpmn_pages, check_schema_pages
from app.jobs.records import Job
from app.jobs.runtime import JobSystem
from app.jobs.status import job_status
from app.service.schemas import InferResponse, JobStatus

JOB_FIELDS = INFER_FIELDS | {"callback_url"}
router = APIRouter(prefix="/jobs", route_class=EnvelopedRoute, tags=["jobs"])
_DESCRIPTIONS = {
    404: "No such job: never submitted, forgotten, or its result expired after JOB_TTL_S",
    409: "The job has not finished (retry after Retry-After), or it was cancelled",
}


_EXAMPLES = {
    404: JobNotFoundError(),
    409: JobNotDoneError("the job is running; poll its status", headers={"Retry-After": "5"}),
    503: JobStoreUnavailableError("the job store is unavailable (postgresql: connection refused); /infer still "
                                  "answers", headers={"Retry-After": "5"}),
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return error_responses(*codes, descriptions=_DESCRIPTIONS, examples=_EXAMPLES)


def _status(request: Request, job: Job) -> JobStatus:
    return job_status(job, prefix=request.scope.get("root_path", ""))


# What an id this service hands out can look like (secrets.token_urlsafe): anything else is no job of ours, and
# never reaches the store (PostgreSQL refuses a NUL in text with an error that would read as the store failing).
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _checked(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise JobNotFoundError()
    return job_id


async def _job(jobs: JobSystem, job_id: str, wait_s: float = 0.0) -> Job:
    job = await jobs.service.get(_checked(job_id), wait_s)
    if job is None:
        raise JobNotFoundError()
    return job


@router.post("", status_code=202, response_model=JobStatus, operation_id="create_job",
             summary="Submit a diagram as a job: 202 at once, the result later",
             description=f"The same form as POST /infer ({ACCEPTED_TEXT}, BPMN, pages). The job runs when the model "
             "has room, on whichever replica sharing the job store claims it first, within JOB_TIMEOUT_S from its "
             "start; it survives a restart or the loss of its replica. Poll `status_url` (or wait on it with "
             "`?wait=N`), or give a `callback_url`; then fetch `result_url`.",
             responses=_errors(400, 401, 408, 413, 415, 422, 500, 503))
async def create_job(
    request: Request,
    response: Response,
    jobs: JobsDep,
    service: ServiceDep,
    file: Annotated[UploadFile, File(description=f"the diagram ({ACCEPTED_TEXT}, or BPMN XML)")],
    prompt: Annotated[str, Form(max_length=PROMPT_MAX_CHARS, description="as in POST /infer")] = "",
    max_new_tokens: Annotated[int, Form(ge=0, description="as in POST /infer")] = 0,
    page: Annotated[int, Form(ge=1, le=10_000, description="as in POST /infer")] = 1,
    pages: Annotated[str, Form(max_length=200, description="as in POST /infer")] = "1",
    format: Annotated[Literal["json", "markdown", "csv"] | None,
                      Form(description="how GET result answers: json (default), markdown or csv")] = None,
    callback_url: Annotated[str, Form(max_length=2048, description="POSTed the job's status JSON when it ends "
                                      "(retried with backoff; signed with X-VLM-Signature when the service has "
                                      "JOB_CALLBACK_SECRET); its host must be in JOB_CALLBACK_HOSTS")] = "",
    json_schema: Annotated[str, Form(max_length=MAX_SCHEMA_CHARS, description="as in POST /infer")] = "",
) -> JobStatus:
    check_form_parts(await request.form(), JOB_FIELDS)
    wanted = json_format_field(json_schema)
    check_table_format(wanted, format or "json")
    params = {"prompt": prompt, "max_new_tokens": max_new_tokens, "pages": pages_asked(page, pages),
              "format": format or "json", "json_schema": wanted.schema if wanted else None}
    data = await file.read()
    # What can be told without the model is told now, not as a failed job later.
    first_page(params["pages"])
    check_schema_pages(wanted, params["pages"])
    if looks_like_bpmn(data):
        check_bpmn_pages(1, params["pages"])
        if wanted is not None:
            raise InvalidRequestError(BPMN_TAKES_NO_SCHEMA, param="json_schema")
    elif sniff_format(data) is None:
        raise UnsupportedMediaError(UNSUPPORTED_FILE)
    if wanted is not None:
        await service.check_json_format(wanted)
    status = _status(request, await jobs.service.submit(params, data, callback_url.strip() or None))
    response.headers["Location"] = status.status_url
    return status


@router.get("/{job_id}", response_model=JobStatus, operation_id="read_job", summary="A job's status",
            responses=_errors(400, 401, 404, 500, 503))
async def read_job(request: Request, job_id: str, jobs: JobsDep,
                   wait: Annotated[float, Query(ge=0, le=60, description="long-poll: answer as soon as the job has "
                                                "ended, or after this many seconds, whichever comes first")] = 0
                   ) -> JobStatus:
    return _status(request, await _job(jobs, job_id, wait))


@router.get("/{job_id}/result", response_model=InferResponse, operation_id="read_job_result",
            summary="A finished job's answer: the body POST /infer would have given",
            responses={**_errors(400, 401, 404, 409, 413, 415, 422, 500, 503, 504),
                       200: {"content": {"text/markdown": {"schema": {"type": "string"}},
                                         "text/csv": {"schema": {"type": "string"}}},
                             "description": "JSON, or the table as markdown or CSV (the job's format)"}})
async def read_job_result(job_id: str, jobs: JobsDep) -> Any:
    job = await _job(jobs, job_id)
    if job.status in ("queued", "running"):
        raise JobNotDoneError(f"the job is {job.status}; poll its status", headers={"Retry-After": "5"})
    if job.status == "cancelled":
        raise JobNotDoneError("the job was cancelled")
    if job.status == "failed":
        raise recorded_error(job.error["status"], job.error["type"], job.error["message"])
    chosen = job.params.get("format", "json")
    if chosen == "json":
        return JSONResponse(job.result)
    table = job.result.get("table")
    if table is None:
        raise NoTableError(f"the answer holds no table ({job.result.get('table_error')}); ask for format=json")
    render, media_type = TABLE_FORMATS[chosen]
    return Response(render(table["columns"], table["rows"]), media_type=media_type)


@router.delete("/{job_id}", response_model=JobStatus, operation_id="delete_job",
               summary="Cancel a queued or running job (200), or forget a finished one (204)",
               responses={**_errors(401, 404, 409, 500, 503), 204: {"description": "forgotten"}})
async def delete_job(request: Request, job_id: str, jobs: JobsDep) -> Any:
    # Each step is one statement: of concurrent DELETEs exactly one cancels (200), whatever replica they reach.
    cancelled = await jobs.service.cancel(_checked(job_id))
    if cancelled is not None:
        return _status(request, cancelled)
    forgotten = await jobs.service.forget(job_id)
    if forgotten == "forgotten":
        return Response(status_code=204)
    if forgotten == "callback pending":  # forgetting it now would lose the callback its client is waiting for
        raise JobNotDoneError("the job has ended, and its callback is still being delivered; forget it once "
                              "its callback status is delivered or failed", headers={"Retry-After": "10"})
    raise JobNotFoundError()
