"""Pydantic models of every response: the OpenAPI spec is the contract."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    type: str = Field(description="machine-readable error class, snake_case", examples=["invalid_image"])
    message: str = Field(description="what is wrong and what to do")
    request_id: str | None = Field(None, description="quote it when reporting a problem")


class ErrorResponse(BaseModel):
    error: ErrorBody


class InferMetadata(BaseModel):
    request_id: str | None
    inference_time: float = Field(description="seconds from admission to answer, queue wait included")
    generation_time: float = Field(description="seconds from the start of its prefill to its last token")
    first_token_time: float | None = Field(None, description="seconds from the start of its prefill to its first "
                                           "token (vision encoder included)")
    preprocess_time: float = Field(description="seconds decoding the upload and building model inputs")
    queue_time: float = Field(description="seconds waited for a KV slot")
    image_size: list[int] | None = Field(description="[width, height] as received: a raster's pixels, an SVG's "
                                         "declared size in CSS px, a PDF page's in points; null for a BPMN file",
                                        examples=[[1024, 768]])
    model_image_size: list[int] | None = Field(description="[width, height] actually fed to the model")
    image_tokens: int = Field(description="vision tokens the image took in the prompt")
    page_count: int = Field(1, description="pages in the file (PDF, TIFF); 1 for other formats")
    source_format: str = Field(description="format detected from the bytes (BPMN: answered from the XML, no "
                               "model)", examples=["PNG"])
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = Field(description="stop: the model ended the answer; length: cut at max_new_tokens; "
                               "repetition: stopped early because the output degenerated into repetition")
    max_new_tokens: int | None = Field(description="the cap this request ran with; null when no model ran")
    model: str | None = Field(description="the base model; null when the answer came from a BPMN file itself")
    adapter: str | None = Field(description="adapter folder merged into the model, or null for the base model")
    device: str | None
    dtype: str | None


class TableData(BaseModel):
    columns: list[str] = Field(examples=[["№", "Наименование действия", "Роль"]])
    rows: list[list[str]] = Field(examples=[[["1", "Принять заявку", "Менеджер"]]])
    truncated: bool = Field(description="the answer was cut at max_new_tokens: rows may be missing",
                            examples=[False])
    dropped_incomplete_row: bool = Field(description="the cut-off last row was dropped", examples=[False])
    warnings: list[str] = Field(description="what the parser had to guess (no separator row, …)", examples=[[]])


class StepRow(BaseModel):
    number: str
    action: str
    role: str
    page: int | None = Field(None, exclude_if=lambda page: page is None,  # absent from single-page answers
                             description="the page it was read from, when several pages were asked for")


class PageResult(BaseModel):
    """One page of a multi-page request: its own answer, or why it has none."""

    page: int
    description: str | None = None
    table: TableData | None = None
    rows: list[StepRow] | None = None
    table_error: str | None = None
    metadata: InferMetadata | None = None
    error: ErrorBody | None = Field(None, description="why this page has no answer (the other pages still do)")


class InferResponse(BaseModel):
    description: str = Field(description="the model's answer, unchanged: a markdown table of steps and roles",
                             examples=["| № | Наименование действия | Роль |\n|---|---|---|\n| 1 | Принять заявку | "
                                       "Менеджер |"])
    table: TableData | None = Field(None, description="the table parsed from description; null when none")
    rows: list[StepRow] | None = Field(None, description="the rows as number/action/role, when the columns "
                                       "are recognized (Russian or English headers)")
    table_error: str | None = Field(None, description="why table is null")
    metadata: InferMetadata
    pages: list[PageResult] | None = Field(None, description="one entry per page when several pages were asked for "
                                           "(pages=2-4, all, ...); the fields above then join them in page order")


class KVCacheInfo(BaseModel):
    slots: int = Field(description="requests that can decode at once (MAX_BATCH_SIZE)")
    slot_tokens: int = Field(description="tokens one slot holds: image budget + MAX_PROMPT_TOKENS + MAX_NEW_TOKENS")
    bytes: int = Field(description="memory the cache takes on the device, allocated once at load")
    slots_in_use: int


class HealthResponse(BaseModel):
    status: str = Field(description="healthy | loading | failed | draining", examples=["healthy"])
    model_loaded: bool
    processor_loaded: bool = Field(description="the processor (tokenizer and image processor) is loaded")
    model: str
    adapter: str | None
    adapter_modules_merged: int | None
    device: str | None
    device_fallback: str | None = Field(None, description="why the DEVICE asked for is not the one in use "
                                        "(e.g. the GPU driver is too old for this build)")
    dtype: str | None = Field(description="the precision the model runs in; null until it is loaded (quantization "
                              "or the CPU's own choice may change what was asked for)")
    model_load_time: float | None = Field(description="seconds from start of load to ready")
    reason: str | None = Field(None, description="why the load failed (status=failed)")
    phase: str | None = Field(None, description="what the load is doing now (status=loading)",
                              examples=["capturing CUDA graphs"])
    queue_depth: int = Field(description="admitted requests without a KV slot yet")
    in_flight: int = Field(description="requests holding a KV slot")
    queued_jobs: int = Field(0, description="jobs accepted and not started yet (the store's count, shared by every "
                             "replica using it)")
    running_jobs: int = Field(0, description="jobs running now (on any replica sharing the job store)")
    jobs_running_here: int = Field(0, description="jobs this replica is running")
    job_store: str | None = Field(None, description="sqlite | postgresql (JOBS_DB)")
    job_store_error: str | None = Field(None, description="why the job routes answer 503 now (the store could not "
                                        "be opened or reached); /infer is not affected and status stays healthy")
    instance_id: str | None = Field(None, description="this process, as job leases name it (host, pid, random)")
    kv_cache: KVCacheInfo | None = None
    decode_mode: str | None = Field(None, description="the decoding path serving, the fastest that passed its startup "
                                    "check: flash-graphs, sdpa-graphs, fused-eager or modules-eager",
                                    examples=["fused-eager"])
    decode_fallback: str | None = Field(None, description="why each faster path is not serving (cannot run here, "
                                        "or failed its check); null when the fastest one is")
    error: ErrorBody | None = Field(None, description="set whenever the status code is not 200")


class MetricsResponse(BaseModel):
    inference_count: int
    total_inference_time: float
    avg_inference_time: float
    model_load_time: float | None
    gpu_memory_allocated_gb: float | None
    gpu_memory_reserved_gb: float | None
    failed_count: int = Field(description="admitted requests the service failed (5xx: deadline, shutdown, internal "
                              "or device error)")
    client_error_count: int = Field(0, description="admitted requests refused for what they sent (4xx: a bad "
                                    "file, a prompt too long, no table)")
    rejected_count: int
    prompt_tokens_total: int
    completion_tokens_total: int
    queue_depth: int
    in_flight: int


class ServiceInfo(BaseModel):
    service: str
    version: str
    status: str
    model: str
    adapter: str | None
    device: str | None
    dtype: str | None
    docs: str = "/docs"
    health: str = "/health"
    metrics: str = "/metrics"


class JobProgress(BaseModel):
    pages_done: int
    pages_total: int


class CallbackInfo(BaseModel):
    url: str
    status: Literal["pending", "delivered", "failed"] | None = Field(
        None, description="null until the job ends; pending while it is being sent or retried")
    attempts: int = Field(0, description="delivery tries so far")


class JobStatus(BaseModel):
    id: str = Field(description="unguessable: whoever holds it can read the result")
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    status_url: str
    result_url: str
    created_at: float = Field(description="Unix time, seconds")
    started_at: float | None = None
    finished_at: float | None = None
    progress: JobProgress | None = Field(None, description="pages answered so far (failed pages count too); null "
                                         "until the job has opened its file")
    error: ErrorBody | None = Field(None, description="why the job failed (status=failed)")
    callback: CallbackInfo | None = Field(None, description="the callback_url given at submission, and how its "
                                          "delivery went")
