"""HTTP routes only: parse the request, call the service, shape the response."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData

from app.errors import InvalidRequestError, NoTableError, NotReadyError
from app.http.access_log import note_answer
from app.http.dependencies import JobsDep, ServiceDep
from app.http.disconnect import until_disconnect
from app.http.envelope import EnvelopedRoute, error_responses
from app.metrics import wants_prometheus
from app.model.grammar import MAX_SCHEMA_CHARS, JsonFormat
from app.pipeline.imaging import ACCEPTED_TEXT
from app.pipeline.table import to_csv, to_markdown
from app.request_context import current_request_id
from app.service.chat_schemas import PROMPT_MAX_CHARS
from app.service.inference import InferParams
from app.service.schemas import ErrorBody, HealthResponse, InferResponse, MetricsResponse, ServiceInfo

logger = logging.getLogger(__name__)
router = APIRouter(route_class=EnvelopedRoute)


@router.post(
    "/infer",
    response_model=InferResponse,
    summary="Extract the steps and roles of a process diagram as a markdown table",
    description=f"Upload a diagram as multipart field `file`. Accepted formats: {ACCEPTED_TEXT}; and BPMN 2.0 XML, "
    "answered from the XML itself without the model. `pages` reads several pages of a PDF or TIFF at once. "
    "Greedy decoding: the same image and prompt give the same table. `json_schema` asks for JSON matching a "
    "schema instead of the table.",
    operation_id="infer_diagram",
    tags=["inference"],
    responses={**error_responses(400, 401, 408, 413, 415, 422, 500, 503, 504),
               200: {"content": {"text/markdown": {"schema": {"type": "string"}},
                                 "text/csv": {"schema": {"type": "string"}}},
                     "description": "JSON (default), or just the table as markdown or CSV (format / Accept)"}},
)
async def infer_diagram(
    request: Request,
    service: ServiceDep,
    file: Annotated[UploadFile, File(description=f"the diagram image ({ACCEPTED_TEXT})")],
    # Plain defaults ("" and 0), not null: Swagger UI would otherwise pre-fill "string" and 1.
    prompt: Annotated[str, Form(description="override the instruction for this request; empty = the default",
                                max_length=PROMPT_MAX_CHARS)] = "",
    max_new_tokens: Annotated[int, Form(ge=0, description="cap on generated tokens, up to MAX_NEW_TOKENS; "
                                        "0 = the default")] = 0,
    page: Annotated[int, Form(ge=1, le=10_000, description="PDF or TIFF page to read (1-based); or use pages")] = 1,
    pages: Annotated[str, Form(max_length=200, description="pages to read: 3, 2-4,7 or all (up to MAX_PAGES); "
                               "more than one adds a pages list and joins the rows")] = "1",
    format: Annotated[Literal["json", "markdown", "csv"] | None,
                      Form(description="json (default), markdown or csv (just the table); or use Accept")] = None,
    json_schema: Annotated[str, Form(max_length=MAX_SCHEMA_CHARS, description=JSON_SCHEMA_FIELD)] = "",
) -> Any:
    check_form_parts(await request.form())  # already parsed by FastAPI: no second read
    ticket = request.state.ticket
    data = await file.read()
    params = InferParams(prompt=prompt, max_new_tokens=max_new_tokens, pages=pages_asked(page, pages),
                         json_format=json_format_field(json_schema))
    chosen = format or _format_from_accept(request.headers.get("accept", ""))
    check_table_format(params.json_format, chosen)
    result = await until_disconnect(request, service.infer(data, params, ticket))
    note_answer(result.metadata)
    if chosen == "json":
        return result
    if result.table is None:
        raise NoTableError(f"the answer holds no table ({result.table_error}); ask for format=json to see it")
    render, media_type = TABLE_FORMATS[chosen]
    return Response(render(result.table.columns, result.table.rows), media_type=media_type)


JSON_SCHEMA_FIELD = ("a JSON schema: the answer (description) is decoded under a grammar built from it, so it is "
                     "JSON valid for the schema, with no markdown table; empty = the usual table")


def json_format_field(text: str) -> JsonFormat | None:
    """The json_schema form field: empty, or a JSON object (a schema; whether it compiles is told later)."""
    if not text.strip():
        return None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidRequestError(f"json_schema is not valid JSON: {error}", param="json_schema") from None
    except RecursionError:
        raise InvalidRequestError("json_schema is nested too deeply", param="json_schema") from None
    if not isinstance(schema, dict):
        raise InvalidRequestError("json_schema must be a JSON object (a JSON schema)", param="json_schema")
    return JsonFormat(schema)


def check_table_format(json_format: JsonFormat | None, chosen: str) -> None:
    """Before anything runs: an answer asked as JSON for a schema has no table to render as markdown or CSV."""
    if json_format is not None and chosen != "json":
        raise InvalidRequestError(f"with json_schema the answer is JSON, not a table: format={chosen} does not "
                                  "apply", param="format")


def pages_asked(page: int, pages: str) -> str:
    """The one pages spec of a form that may say ``page`` (the older field) or ``pages``."""
    if page != 1 and pages.strip() != "1":
        raise InvalidRequestError("send page or pages, not both")
    return str(page) if page != 1 else pages


INFER_FIELDS = frozenset({"file", "prompt", "max_new_tokens", "page", "pages", "format", "json_schema"})


def check_form_parts(form: FormData, fields: frozenset[str] = INFER_FIELDS) -> None:
    """One file per request, and only known fields: a part the service would ignore is an answer to another
    question (a second diagram silently dropped, a misspelt option silently defaulted)."""
    files = form.getlist("file")
    if len(files) > 1:
        raise InvalidRequestError(f"one file per request ({len(files)} file parts given): send each diagram on its "
                                  "own request")
    unknown = sorted(set(form.keys()) - fields)
    if unknown:
        raise InvalidRequestError(f"unknown form field(s): {', '.join(unknown)}; the fields are "
                                  f"{', '.join(sorted(fields))}")


TABLE_FORMATS = {"markdown": (to_markdown, "text/markdown; charset=utf-8"), "csv": (to_csv, "text/csv; charset=utf-8")}


def _format_from_accept(accept: str) -> str:
    accept = accept.lower()
    if "text/markdown" in accept:
        return "markdown"
    return "csv" if "text/csv" in accept else "json"


def _not_ready(health: HealthResponse, error: NotReadyError) -> JSONResponse:
    """503 with the health body plus the error envelope's "error" object."""
    body = health.model_dump()
    body["error"] = ErrorBody(type=error.error_type, message=error.message,
                              request_id=current_request_id()).model_dump()
    return JSONResponse(body, status_code=503, headers=error.headers)


@router.get(
    "/health",
    response_model=HealthResponse,
    summary="Readiness: 200 only when the model is loaded, merged, verified and warmed up",
    operation_id="read_health",
    tags=["operations"],
    responses={503: {"model": HealthResponse, "description": "loading, failed or draining"},
               **error_responses(500)},
)
async def read_health(service: ServiceDep, jobs: JobsDep) -> Any:
    """HEAD gives the same status without the body (load balancers that probe with HEAD)."""
    health = service.health(jobs.health(), jobs.owner)
    if health.status == "healthy":
        return health
    return _not_ready(health, service.runner.not_ready_error())


router.add_api_route("/health", read_health, methods=["HEAD"], include_in_schema=False)


@router.get(
    "/metrics",
    response_model=MetricsResponse,
    summary="Counters and timings: JSON by default, Prometheus text when asked for",
    description="JSON for browsers and `curl`. Prometheus exposition when `Accept` contains `text/plain` or "
    "`application/openmetrics-text` (what a Prometheus server sends), or with `?format=prometheus`.",
    operation_id="read_metrics",
    tags=["operations"],
    responses={**error_responses(400, 401, 500),
               200: {"content": {"text/plain": {"schema": {"type": "string"}},
                                 "application/openmetrics-text": {"schema": {"type": "string"}}},
                     "description": "JSON counters, or the Prometheus exposition"}},
)
async def read_metrics(
    request: Request,
    service: ServiceDep,
    format: Annotated[Literal["json", "prometheus", "text", "openmetrics"] | None,
                      Query(description="force a format: json, prometheus or text (text 0.0.4), openmetrics")] = None,
) -> Any:
    accept = request.headers.get("accept", "")
    if format != "json" and wants_prometheus(accept, format):
        if format == "openmetrics":
            accept = "application/openmetrics-text; version=1.0.0"
        elif format in ("prometheus", "text"):
            accept = "text/plain; version=0.0.4"
        body, content_type = service.prometheus.render(accept)
        return Response(body, media_type=content_type)
    return service.json_metrics()


@router.get("/", response_model=ServiceInfo, summary="What this service is and where to look next",
            operation_id="read_root", tags=["operations"], responses=error_responses(500))
async def read_root(service: ServiceDep) -> ServiceInfo:
    return service.info()
