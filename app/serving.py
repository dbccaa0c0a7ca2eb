"""Request -> decoded image -> engine -> response. The service object the routes talk to."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

from . import SERVICE_NAME, __version__
from .access import note
from .decoder import DecoderPool
from .device import Placement, resolve_placement
from .engine import Engine, GenerationResult, ServingDefaults
from .errors import DeadlineExceededError, InvalidRequestError, ServiceError
from .guards import RepetitionGuard
from .imaging import PreparedImage
from .loader import ModelLoadError, load_model
from .metrics import Metrics
from .protocol import HealthResponse, InferMetadata, InferResponse, MetricsResponse, ServiceInfo, StepRow, TableData
from .requestid import current_request_id
from .runner import ModelState, Runner, Ticket
from .settings import Settings
from .stats import InferenceStats, gpu_memory_bytes, gpu_memory_gb
from .table import TableNotFoundError, parse_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferParams:
    prompt: str | None = None
    max_new_tokens: int | None = None
    page: int = 1


def build_response(text: str, metadata: InferMetadata) -> InferResponse:
    """The raw answer plus its parsed table (or why there is none)."""
    try:
        table = parse_table(text, truncated=metadata.finish_reason == "length")
    except TableNotFoundError as error:
        return InferResponse(description=text, table_error=str(error), metadata=metadata)
    return InferResponse(
        description=text,
        table=TableData(columns=table.columns, rows=table.rows, truncated=table.truncated,
                        dropped_incomplete_row=table.dropped_incomplete_row, warnings=table.warnings),
        rows=[StepRow(**record) for record in table.records] if table.records is not None else None,
        table_error=None if table.records is not None else "columns not recognized as number/action/role",
        metadata=metadata,
    )


class InferenceService:
    """Owns the runner and the counters; knows nothing about HTTP."""

    def __init__(self, settings: Settings, engine_factory: Callable[[], Engine] | None = None):
        self.settings = settings
        self.runner = Runner(settings.max_queue, settings.max_batch_size, settings.batch_wait_ms / 1000)
        # Tests inject a fake factory where HTTP behaviour, not the model, is the point.
        self.engine_factory = engine_factory or self.build_engine
        self.decoder = DecoderPool(settings.decode_workers)
        self.stats = InferenceStats()
        self.prometheus = Metrics()
        self.prometheus.queue_depth.set_function(lambda: self.runner.queue_depth)
        self.prometheus.in_flight.set_function(lambda: self.runner.in_flight)
        self.prometheus.gpu_allocated.set_function(lambda: gpu_memory_bytes()[0])
        self.prometheus.gpu_reserved.set_function(lambda: gpu_memory_bytes()[1])
        self.placement: Placement | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    def build_engine(self) -> Engine:
        """Blocking: load, merge, verify and warm up. Runs on the model thread."""
        self.placement = resolve_placement(self.settings.device, self.settings.torch_dtype)
        loaded = load_model(self.settings, self.placement)
        self.placement = loaded.placement  # quantization may have changed the precision
        engine = Engine(loaded, ServingDefaults.from_sources(self.settings, loaded.params),
                        repetition_guard=RepetitionGuard() if self.settings.repetition_guard else None,
                        force_max_new_tokens=self.settings.force_max_new_tokens,
                        torch_compile=self.settings.torch_compile)
        control = engine.control_tokens_in(engine.defaults.prompt)
        if control:
            raise ModelLoadError(f"the default prompt (PROMPT or the adapter's params.json) contains the control "
                                 f"token {control[0]}; the service inserts the image and chat turns itself")
        if self.settings.warmup:
            started = time.perf_counter()
            engine.warmup()
            logger.info("warm-up generation took %.2f s", time.perf_counter() - started)
        return engine

    async def start(self) -> None:
        await self.runner.load(self.engine_factory, self.decoder.warm())
        engine = self.runner.engine
        if engine is not None:
            loaded = engine.loaded
            self.prometheus.model_load.set(self.runner.load_time_s or 0.0)
            self.prometheus.model_info.labels(
                loaded.model_id, loaded.adapter.path if loaded.adapter else "none", loaded.placement.device,
                loaded.placement.dtype_name).set(1)

    def close(self) -> None:
        self.runner.close()
        self.decoder.close()

    # --- inference -------------------------------------------------------------------------------
    async def infer(self, data: bytes, params: InferParams, ticket: Ticket) -> InferResponse:
        engine = self.runner.engine
        prompt, max_new_tokens = self._request_options(engine, params)
        started = ticket.admitted_at
        deadline = started + self.settings.request_timeout_s
        try:
            prepared = await self._decode(data, engine, params.page, deadline)
            # Tokens and image patches here, in parallel with the batch the model thread is running.
            inputs = await asyncio.to_thread(engine.prepare, prepared.image, prompt)
            ready = time.perf_counter()
            result, queue_s = await self.runner.generate(prepared.image, prompt, max_new_tokens, inputs=inputs,
                                                         timeout_s=max(deadline - ready, 0.001))
        except ServiceError as error:
            self.stats.failed_count += 1
            if isinstance(error, DeadlineExceededError):
                self.prometheus.finish_reasons.labels("timeout").inc()
            raise
        finished = time.perf_counter()
        self.stats.record_success(finished - started, result.prompt_tokens, result.completion_tokens)
        metadata = self._metadata(engine, prepared, result, finished - started, queue_s,
                                  (ready - started) + result.preprocess_time_s, max_new_tokens)
        self._observe(metadata, result)
        return build_response(result.text, metadata)

    def _observe(self, metadata: InferMetadata, result: GenerationResult) -> None:
        metrics = self.prometheus
        metrics.queue_wait.observe(metadata.queue_time)
        metrics.preprocess.observe(metadata.preprocess_time)
        if result.first_token_time_s is not None:
            metrics.first_token.observe(result.first_token_time_s)
        metrics.generation.observe(result.generation_time_s)
        metrics.prompt_tokens.inc(result.prompt_tokens)
        metrics.image_tokens.inc(result.image_tokens)
        metrics.generated_tokens.inc(result.completion_tokens)
        metrics.image_tokens_per_request.observe(result.image_tokens)
        metrics.generated_tokens_per_request.observe(result.completion_tokens)
        metrics.finish_reasons.labels(result.finish_reason).inc()
        note(image_size=metadata.image_size, prompt_tokens=result.prompt_tokens,
             completion_tokens=result.completion_tokens, finish_reason=result.finish_reason)

    async def _decode(self, data: bytes, engine: Engine, page: int, deadline: float) -> PreparedImage:
        """Decode in a worker process, within the request's deadline."""
        return await self.decoder.prepare(
            data, engine.geometry, page=page, max_decoded_pixels=self.settings.max_decoded_pixels,
            timeout_s=max(deadline - time.perf_counter(), 0.001),
        )

    def _request_options(self, engine: Engine, params: InferParams) -> tuple[str, int]:
        defaults = engine.defaults
        own_prompt = bool(params.prompt and params.prompt.strip())
        prompt = params.prompt if own_prompt else defaults.prompt
        # The effective MAX_NEW_TOKENS (environment, else the adapter's params.json) is default and limit.
        limit = defaults.max_new_tokens
        max_new_tokens = params.max_new_tokens or limit
        if max_new_tokens > limit:
            raise InvalidRequestError(f"max_new_tokens={max_new_tokens} is over this service's limit of {limit}")
        control = engine.control_tokens_in(prompt) if own_prompt else []  # the default is checked at load
        if control:
            raise InvalidRequestError(f"the prompt contains {control[0]}, one of the model's control tokens; "
                                      "remove it (the image is inserted by the service)")
        return prompt, max_new_tokens

    def _metadata(self, engine: Engine, prepared: PreparedImage, result: GenerationResult, total_s: float,
                  queue_s: float, preprocess_s: float, max_new_tokens: int) -> InferMetadata:
        loaded = engine.loaded
        return InferMetadata(
            request_id=current_request_id(),
            inference_time=round(total_s, 4),
            generation_time=round(result.generation_time_s, 4),
            first_token_time=round(result.first_token_time_s, 4) if result.first_token_time_s is not None else None,
            preprocess_time=round(preprocess_s, 4),
            queue_time=round(queue_s, 4),
            image_size=list(prepared.received_size),
            model_image_size=list(prepared.model_size),
            image_tokens=result.image_tokens,
            source_format=prepared.source_format,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            finish_reason=result.finish_reason,
            max_new_tokens=max_new_tokens,
            model=loaded.model_id,
            adapter=loaded.adapter.path if loaded.adapter else None,
            device=loaded.placement.device,
            dtype=loaded.placement.dtype_name,
        )

    # --- status views ----------------------------------------------------------------------------
    def _adapter(self) -> str | None:
        engine = self.runner.engine
        return engine.loaded.adapter.path if engine and engine.loaded.adapter else None

    def _status(self) -> str:
        state = self.runner.state
        return "healthy" if state == ModelState.ready else state.value

    def health(self) -> HealthResponse:
        runner, engine, placement = self.runner, self.runner.engine, self.placement
        return HealthResponse(
            status=self._status(),
            model_loaded=engine is not None,
            processor_loaded=engine is not None,
            model=self.settings.base_model_id,
            adapter=self._adapter(),
            adapter_modules_merged=engine.loaded.adapter.merged_modules if engine and engine.loaded.adapter
            else None,
            device=placement.device if placement else None,
            dtype=placement.dtype_name if placement else None,
            model_load_time=round(runner.load_time_s, 3) if runner.load_time_s is not None else None,
            reason=runner.failure_reason,
            queue_depth=runner.queue_depth,
            in_flight=runner.in_flight,
        )

    def json_metrics(self) -> MetricsResponse:
        allocated, reserved = gpu_memory_gb()
        stats = self.stats
        return MetricsResponse(
            inference_count=stats.inference_count,
            total_inference_time=round(stats.total_inference_time, 4),
            avg_inference_time=round(stats.avg_inference_time, 4),
            model_load_time=self.runner.load_time_s,
            gpu_memory_allocated_gb=allocated,
            gpu_memory_reserved_gb=reserved,
            failed_count=stats.failed_count,
            rejected_count=stats.rejected_count,
            prompt_tokens_total=stats.prompt_tokens,
            completion_tokens_total=stats.completion_tokens,
            queue_depth=self.runner.queue_depth,
            in_flight=self.runner.in_flight,
        )

    def info(self) -> ServiceInfo:
        placement = self.placement
        return ServiceInfo(
            service=SERVICE_NAME, version=__version__, status=self._status(), model=self.settings.base_model_id,
            adapter=self._adapter(), device=placement.device if placement else None,
            dtype=placement.dtype_name if placement else None,
        )
