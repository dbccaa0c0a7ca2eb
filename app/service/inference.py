"""Request -> decoded image -> engine -> response. The service object the routes talk to."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable, Iterator

from PIL import Image

from app import SERVICE_NAME, __version__
from app.cpu_quota import apply_torch_threads, available_cpus
from app.errors import DeadlineExceededError, InvalidRequestError, ModelLoadError, OverloadedError, ServiceError
from app.metrics import Metrics, cuda_in_use, gpu_memory_bytes
from app.model.decode_paths import DECODE_MODES
from app.model.device import Placement, resolve_placement
from app.model.engine import Engine, EngineLimits, GenerationResult, PromptTooLongError, ServingDefaults
from app.model.grammar import JsonFormat
from app.model.loader import load_model
from app.model.sampling import GREEDY, RowSampler, SamplingParams
from app.model.scheduler import generate
from app.model.sequence import PreparedInputs, Sequence
from app.pipeline.bpmn import looks_like_bpmn, parse_bpmn
from app.pipeline.decode_pool import DecoderPool
from app.pipeline.imaging import ImageFacts, PreparedImage
from app.pipeline.pages import first_page, names_several_pages, select_pages
from app.pipeline.repetition import RepetitionGuard
from app.pipeline.table import TableNotFoundError, parse_table, to_markdown
from app.request_context import current_request_id
from app.service.multipage import join_pages
from app.service.runner import ModelState, Runner, Ticket

if TYPE_CHECKING:
    from app.jobs.runtime import JobsHealth
from app.service.schemas import (
    HealthResponse,
    InferMetadata,
    InferResponse,
    KVCacheInfo,
    MetricsResponse,
    ServiceInfo,
    StepRow,
    TableData,
)
from app.settings import Settings, removed_settings_in

logger = logging.getLogger(__name__)

# A job's pages are decoded and queued this many at a time: prepared shortly before they can run, instead of all
# holding their pixels and patches while they wait behind synchronous requests.
JOB_PAGES_IN_FLIGHT = 2
Progress = Callable[[int, int], Awaitable[None]]  # (pages done, pages in all): how far a running job got


async def _no_progress(done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class InferParams:
    prompt: str | None = None
    max_new_tokens: int | None = None
    page: int = 1  # the page this request's inputs are built from
    pages: str = "1"  # the pages asked for: "3", "2-4,7" or "all"
    system: str | None = None  # the chat template's system turn (OpenAI system messages)
    sampling: SamplingParams = GREEDY
    json_format: JsonFormat | None = None  # structured output: the answer is JSON for this schema


@dataclass(frozen=True)
class PreparedRequest:
    """An admitted request whose file is decoded and whose model inputs are built: all that generation needs."""

    engine: Engine
    image: ImageFacts
    inputs: PreparedInputs
    max_new_tokens: int
    ticket: Ticket
    ready_at: float
    deadline: float
    sampler: RowSampler | None = None  # None: plain greedy

    def time_left_s(self) -> float:
        return max(self.deadline - time.perf_counter(), 0.001)


JOB_SCHEMA_CHECK_S = 5.0  # how long a job's submission waits for its schema's grammar before accepting the job
BPMN_TAKES_NO_SCHEMA = ("a BPMN file is answered from its XML as a markdown table; a JSON schema "
                        "(json_schema, response_format) does not apply to it")


def check_schema_pages(json_format: JsonFormat | None, spec: str, several: bool | None = None) -> None:
    """One schema, one JSON document: a JSON schema with several pages is a 400. ``several``: whether the pages
    selected from the file are; without it, told from ``spec`` alone (``all`` waits for the file)."""
    if json_format is not None and (names_several_pages(spec) if several is None else several):
        raise InvalidRequestError(f"json_schema answers one page as one JSON document; pages={spec} names several: "
                                  "send each page as its own request", param=json_format.param)


def check_bpmn_pages(page: int, pages: str) -> None:
    """A BPMN file is one table: page numbers past 1 name something it does not have (400, as for a PNG)."""
    if page != 1 or pages.strip().lower() not in ("1", "all"):
        asked = f"page={page}" if page != 1 else f"pages={pages}"
        raise InvalidRequestError(f"{asked} applies to PDF and TIFF uploads only; this file is BPMN XML",
                                  param="pages")


def blank_diagram() -> Image.Image:
    return Image.new("RGB", (256, 192), "white")


def check_default_prompt(engine: Engine) -> None:
    """A default prompt that every request would fail with is a load failure, with the reason in /health."""
    prompt, source = engine.defaults.prompt, "the default prompt (PROMPT or the adapter's params.json)"
    control = engine.control_tokens_in(prompt)
    if control:
        raise ModelLoadError(f"{source} contains the control token {control[0]}; the service inserts the image "
                             "and chat turns itself")
    try:
        engine.prepare(blank_diagram(), prompt)
    except PromptTooLongError as error:
        raise ModelLoadError(f"{source} is too long: {error}") from None


def decoder_workers(requested: int) -> int:
    """DECODE_WORKERS, at most one per CPU the container has: more would only queue on the same cores as the
    model's threads (the workers run at a lower priority, app/pipeline/decode_pool.py)."""
    cpus = available_cpus()
    if requested > cpus:
        logger.info("DECODE_WORKERS=%d, but this container has %d CPU(s): %d upload decoder(s)", requested, cpus,
                    cpus)
    return min(requested, cpus)


def warm_up(engine: Engine) -> GenerationResult:
    """One short generation on a blank diagram-sized image, so the first request pays no setup."""
    inputs = engine.prepare(blank_diagram(), engine.defaults.prompt)
    return generate(engine, [Sequence(inputs, max_new_tokens=2)])[0]


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
        self.runner = Runner(settings.max_queue, settings.prefill_token_budget, settings.decoding_prefill_token_budget)
        for warning in removed_settings_in(dict(os.environ)):
            logger.warning(warning)
        # Tests inject a fake factory where HTTP behaviour, not the model, is the point.
        self.engine_factory = engine_factory or self.build_engine
        self.decoder = DecoderPool(decoder_workers(settings.decode_workers), decode_timeout_s=settings.decode_timeout_s)
        self.prometheus = Metrics()
        self.prometheus.queue_depth.set_function(lambda: self.runner.queue_depth)
        self.prometheus.in_flight.set_function(lambda: self.runner.in_flight)
        self.prometheus.slots_in_use.set_function(lambda: self.runner.in_flight)
        self.prometheus.gpu_allocated.set_function(lambda: gpu_memory_bytes()[0])
        self.prometheus.gpu_reserved.set_function(lambda: gpu_memory_bytes()[1])
        self.prometheus.device_fallback.set_function(
            lambda: 1 if self.placement is not None and self.placement.device_fallback else 0)
        self.placement: Placement | None = None
        self.loaded_at: int | None = None  # Unix time the model became ready

    # --- lifecycle -------------------------------------------------------------------------------
    def build_engine(self) -> Engine:
        """Blocking: load, merge, verify, allocate the KV slots, capture the decoding step, warm up. Runs on the
        model thread; each phase shows in /health while it runs."""
        settings, runner = self.settings, self.runner
        runner.phase = "loading weights"
        apply_torch_threads()  # the container's CPUs, not the host's: the decoding step and the vision encoder
        self.placement = resolve_placement(settings.device, settings.torch_dtype)
        if self.placement.device_fallback and settings.device_strict:
            raise ModelLoadError(f"{self.placement.device_fallback.removesuffix('; falling back to cpu')} "
                                 "and DEVICE_STRICT=true")
        loaded = load_model(settings, self.placement)
        self.placement = loaded.placement  # quantization may have changed the precision
        runner.phase = "allocating the KV cache"
        rows = settings.max_batch_size or (32 if loaded.placement.device == "cuda" else 8)
        engine = Engine(loaded, ServingDefaults.from_sources(settings, loaded.params),
                        repetition_guard=RepetitionGuard() if settings.repetition_guard else None,
                        force_max_new_tokens=settings.force_max_new_tokens,
                        limits=EngineLimits(max_rows=rows, max_prompt_tokens=settings.max_prompt_tokens))
        check_default_prompt(engine)
        info = engine.cache_info()
        logger.info("KV cache: %d slots x %d tokens, %.2f GiB", info["slots"], info["slot_tokens"],
                    info["bytes"] / 2 ** 30)
        runner.phase = "checking the decoding step" + (" (capturing CUDA graphs)" if settings.cuda_graphs
                                                        and loaded.placement.device == "cuda" else "")
        engine.choose_decode_path(cuda_graphs=settings.cuda_graphs)
        if settings.warmup:
            runner.phase = "warm-up generation"
            started = time.perf_counter()
            warm_up(engine)
            logger.info("warm-up generation took %.2f s", time.perf_counter() - started)
        return engine

    async def start(self) -> None:
        await self.runner.load(self.engine_factory, self.decoder.warm())
        engine = self.runner.engine
        if engine is not None:
            self.loaded_at = int(time.time())
            loaded = engine.loaded
            self.prometheus.model_load.set(self.runner.load_time_s or 0.0)
            self.prometheus.slots.set(engine.max_rows)
            for mode in DECODE_MODES:
                self.prometheus.decode_mode.labels(mode).set(1 if mode == engine.decode_mode else 0)
            self.prometheus.model_info.labels(
                loaded.model_id, loaded.adapter.path if loaded.adapter else "none", loaded.placement.device,
                loaded.placement.dtype_name).set(1)

    def close(self) -> None:
        self.runner.close()
        self.decoder.close()

    async def run_job(self, data: bytes, params: dict, ticket: Ticket, progress: Progress) -> InferResponse:
        """A job's request, exactly as /infer would run it (its ticket is a background one)."""
        schema = params.get("json_schema")  # jobs queued before json_schema existed have none
        return await self.infer(data, InferParams(prompt=params["prompt"], max_new_tokens=params["max_new_tokens"],
                                                  pages=params["pages"],
                                                  json_format=JsonFormat(schema) if schema else None),
                                ticket, progress)

    async def check_json_format(self, wanted: JsonFormat) -> None:
        """A job's schema compiled at submission, so one that cannot be used is a 400 then, not a failed job
        later (and its requests find it cached). With no model loaded yet, or a compile that takes longer than a
        submission should wait, the job's run tells instead."""
        if self.runner.state != ModelState.ready:
            return
        try:  # a GrammarError is the submission's 400
            await asyncio.to_thread(self.runner.engine.compile_grammar, wanted, JOB_SCHEMA_CHECK_S)
        except OverloadedError:  # compiles backed up or slow: it lands in the cache, or the job's run compiles it
            pass

    # --- inference -------------------------------------------------------------------------------
    async def prepare(self, data: bytes, params: InferParams, ticket: Ticket) -> PreparedRequest:
        """Check the options, decode the file and build the model inputs: every 4xx a request can earn
        happens here, before any generation (and before a stream's first byte)."""
        with self._accounted():
            engine = self.runner.engine
            prompt, max_new_tokens = self._request_options(engine, params)
            deadline = ticket.admitted_at + (ticket.timeout_s or self.settings.request_timeout_s)
            prepared = await self._decode(data, engine, params.page, deadline)
            # Tokens, image patches and the grammar here, in parallel with the steps the model thread is running.
            inputs, sampler = await asyncio.to_thread(self._prepare, engine, prepared.image, prompt, params)
            # Only the facts about the image go on: its pixels are in the inputs now, and a queued request should
            # not hold them twice.
            return PreparedRequest(engine, prepared.facts, inputs, max_new_tokens, ticket, time.perf_counter(),
                                   deadline, sampler)

    async def infer(self, data: bytes, params: InferParams, ticket: Ticket,
                    progress: Progress = _no_progress) -> InferResponse:
        if looks_like_bpmn(data):
            response = await self.read_bpmn(data, params, ticket)
            await progress(1, 1)
            return response
        first = first_page(params.pages)
        request = await self.prepare(data, dataclasses.replace(params, page=first), ticket)
        if params.pages.strip() == str(first):  # one page: the answer as it always was
            await progress(0, 1)
            response = await self.complete(request)
            await progress(1, 1)
            return response
        pages = select_pages(params.pages, request.image.page_count, self.settings.max_pages)
        check_schema_pages(params.json_format, params.pages, several=len(pages) > 1)
        return await self._infer_pages(data, params, ticket, request, pages, progress)

    async def _infer_pages(self, data: bytes, params: InferParams, ticket: Ticket, first: PreparedRequest,
                           pages: list[int], progress: Progress) -> InferResponse:
        """Every page as its own sequence, generated concurrently (the batcher runs them side by side); a page
        that fails says so in its entry while the others answer."""
        done = 0
        ticket.expect(len(pages))  # each page waits for a slot on its own, and is counted so
        in_flight = asyncio.Semaphore(JOB_PAGES_IN_FLIGHT if ticket.background else len(pages))
        await progress(done, len(pages))

        async def one(page: int, prepared: PreparedRequest | None = None) -> InferResponse | ServiceError:
            nonlocal done
            outcome: InferResponse | ServiceError
            async with in_flight:
                try:
                    try:
                        prepared = prepared or await self.prepare(data, dataclasses.replace(params, page=page),
                                                                  ticket)
                    except BaseException:
                        ticket.left_queue()  # this page never reached the model
                        raise
                    outcome = await self.complete(prepared, count_request=False)
                except ServiceError as error:
                    outcome = error
                except Exception:  # noqa: BLE001 - a device error on one page: that page failed, say so
                    logger.exception("page %d failed", page)
                    outcome = ServiceError()
            done += 1  # answered or failed, the page is behind us
            await progress(done, len(pages))
            return outcome

        outcomes = await asyncio.gather(one(pages[0], first), *(one(page) for page in pages[1:]))
        elapsed = time.perf_counter() - ticket.admitted_at
        response = join_pages(list(zip(pages, outcomes)), elapsed)
        self.prometheus.inference_duration.observe(elapsed)
        return response

    async def read_bpmn(self, data: bytes, params: InferParams, ticket: Ticket) -> InferResponse:
        """A BPMN file already holds its table: its tasks in flow order with their lanes, read from the XML
        itself. No model runs, so the answer is exact, and immediate."""
        check_bpmn_pages(params.page, params.pages)
        if params.json_format is not None:
            raise InvalidRequestError(BPMN_TAKES_NO_SCHEMA, param=params.json_format.param)
        rows = await asyncio.to_thread(parse_bpmn, data)  # a 20 MB XML is ~0.1 s: not on the event loop
        columns = ["№", "Наименование действия", "Роль"]
        table_rows = [[str(number), row.action, row.role] for number, row in enumerate(rows, start=1)]
        warnings = []
        if (params.prompt and params.prompt.strip()) or params.max_new_tokens or params.system \
                or not params.sampling.is_greedy:
            warnings.append("answered from the BPMN XML itself: the prompt (system messages included), sampling and "
                            "max_new_tokens do not apply")
        elapsed = time.perf_counter() - ticket.admitted_at
        self.prometheus.inference_duration.observe(elapsed)
        metadata = InferMetadata(
            request_id=current_request_id(), inference_time=round(elapsed, 4), generation_time=0.0,
            preprocess_time=round(elapsed, 4), queue_time=0.0, image_size=None, model_image_size=None,
            image_tokens=0, source_format="BPMN", prompt_tokens=0, completion_tokens=0, finish_reason="stop",
            max_new_tokens=None, model=None, adapter=None, device=None, dtype=None)
        return InferResponse(
            description=to_markdown(columns, table_rows).rstrip("\n"),
            table=TableData(columns=columns, rows=table_rows, truncated=False, dropped_incomplete_row=False,
                            warnings=warnings),
            rows=[StepRow(number=number, action=action, role=role) for number, action, role in table_rows],
            table_error=None if rows else "the BPMN file holds no named task",
            metadata=metadata)

    async def complete(self, request: PreparedRequest, count_request: bool = True) -> InferResponse:
        """Generate the whole answer, then respond."""
        with self._accounted():
            result = await self.runner.generate(request.inputs, request.max_new_tokens, request.ticket,
                                                timeout_s=request.time_left_s(), sampler=request.sampler)
        return self.respond(request, result, count_request)

    async def stream(self, request: PreparedRequest) -> AsyncIterator[list[int] | GenerationResult]:
        """The generation's new tokens as they come, then its result (pass it to ``respond``). Closing the
        iterator early (the client went away) stops the generation at the next step."""
        result: GenerationResult | None = None
        with self._accounted():
            async with contextlib.aclosing(self.runner.stream(request.inputs, request.max_new_tokens, request.ticket,
                                                              timeout_s=request.time_left_s(),
                                                              sampler=request.sampler)) as run:
                async for item in run:
                    if isinstance(item, GenerationResult):
                        result = item
                        break
                    yield item
        if result is not None:  # outside the accounting: a reader that stops after the result abandoned nothing
            yield result

    def respond(self, request: PreparedRequest, result: GenerationResult, count_request: bool = True
                ) -> InferResponse:
        """Count a finished generation and shape its answer (``count_request``: it is the whole request, not
        one of its pages)."""
        finished = time.perf_counter()
        started = request.ticket.admitted_at
        if count_request:
            self.prometheus.inference_duration.observe(finished - started)
        metadata = self._metadata(request.engine, request.image, result, finished - started, result.queue_time_s,
                                  request.ready_at - started, request.max_new_tokens)
        self._observe(metadata, result)
        return build_response(result.text, metadata)

    @contextlib.contextmanager
    def _accounted(self) -> Iterator[None]:
        """Deadlines and abandoned requests counted as finish reasons, the same way on every route (refusals
        and failures are counted from the answers, by the access log)."""
        try:
            yield
        except DeadlineExceededError:
            self.prometheus.finish_reasons.labels("timeout").inc()
            raise
        except (asyncio.CancelledError, GeneratorExit):  # the client went away: its generation stops at the next step
            self.prometheus.finish_reasons.labels("cancelled").inc()
            raise

    def _observe(self, metadata: InferMetadata, result: GenerationResult) -> None:
        metrics = self.prometheus
        metrics.queue_wait.observe(metadata.queue_time)
        metrics.preprocess.observe(metadata.preprocess_time)
        if result.first_token_time_s is not None:
            metrics.first_token.observe(result.first_token_time_s)
            if result.completion_tokens > 1:
                metrics.time_per_output_token.observe(
                    (result.generation_time_s - result.first_token_time_s) / (result.completion_tokens - 1))
        metrics.generation.observe(result.generation_time_s)
        metrics.prompt_tokens.inc(result.prompt_tokens)
        metrics.image_tokens.inc(result.image_tokens)
        metrics.generated_tokens.inc(result.completion_tokens)
        metrics.image_tokens_per_request.observe(result.image_tokens)
        metrics.generated_tokens_per_request.observe(result.completion_tokens)
        metrics.finish_reasons.labels(result.finish_reason).inc()

    @staticmethod
    def _prepare(engine: Engine, image, prompt: str, params: InferParams) -> tuple[PreparedInputs, RowSampler | None]:
        try:
            inputs = engine.prepare(image, prompt, params.system)
            return inputs, engine.sampler(inputs, params.sampling, params.json_format)
        except PromptTooLongError as error:
            raise InvalidRequestError(str(error)) from None

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
        control = engine.control_tokens_in(params.system or "")
        if control:
            raise InvalidRequestError(f"the system message contains {control[0]}, one of the model's control "
                                      "tokens; remove it (the service writes the chat turns)", param="messages")
        return prompt, max_new_tokens

    def _metadata(self, engine: Engine, prepared: ImageFacts, result: GenerationResult, total_s: float,
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
            page_count=prepared.page_count,
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

    def health(self, jobs: JobsHealth | None = None, instance_id: str | None = None) -> HealthResponse:
        """The model's state, with the job store's (which never makes the service unhealthy: /infer needs none)."""
        runner, engine, placement = self.runner, self.runner.engine, self.placement
        return HealthResponse(
            status=self._status(),
            model_loaded=engine is not None,
            processor_loaded=engine is not None and getattr(engine.loaded, "processor", None) is not None,
            model=self.settings.base_model_id,
            adapter=self._adapter(),
            adapter_modules_merged=engine.loaded.adapter.merged_modules if engine and engine.loaded.adapter
            else None,
            device=placement.device if placement else None,
            device_fallback=placement.device_fallback if placement else None,
            dtype=engine.loaded.placement.dtype_name if engine is not None else None,  # not a provisional value
            model_load_time=round(runner.load_time_s, 3) if runner.load_time_s is not None else None,
            reason=runner.failure_reason,
            phase=runner.phase,
            queue_depth=runner.queue_depth,
            in_flight=runner.in_flight,
            queued_jobs=jobs.queued if jobs else 0,
            running_jobs=jobs.running if jobs else 0,
            jobs_running_here=jobs.running_here if jobs else 0,
            job_store=jobs.store if jobs else None,
            job_store_error=jobs.store_error if jobs else None,
            instance_id=instance_id,
            kv_cache=KVCacheInfo(**engine.cache_info()) if engine is not None else None,
            decode_mode=engine.decode_mode if engine is not None else None,
            decode_fallback=engine.decode_fallback if engine is not None else None,
        )

    def json_metrics(self) -> MetricsResponse:
        """The JSON view of the Prometheus registry: the same numbers, summed over their labels."""
        metrics = self.prometheus
        answered = metrics.total(metrics.inference_duration, "_count")
        total_time = metrics.total(metrics.inference_duration, "_sum")
        cuda = cuda_in_use()
        allocated, reserved = gpu_memory_bytes()
        return MetricsResponse(
            inference_count=int(answered),
            total_inference_time=round(total_time, 4),
            avg_inference_time=round(total_time / answered, 4) if answered else 0.0,
            model_load_time=self.runner.load_time_s,
            gpu_memory_allocated_gb=allocated / 2 ** 30 if cuda else None,  # null without CUDA, where Prometheus says 0
            gpu_memory_reserved_gb=reserved / 2 ** 30 if cuda else None,
            failed_count=int(metrics.total(metrics.failed)),
            client_error_count=int(metrics.total(metrics.client_errors)),
            rejected_count=int(metrics.total(metrics.rejected)),
            prompt_tokens_total=int(metrics.total(metrics.prompt_tokens)),
            completion_tokens_total=int(metrics.total(metrics.generated_tokens)),
            queue_depth=self.runner.queue_depth,
            in_flight=self.runner.in_flight,
        )

    def info(self) -> ServiceInfo:
        placement = self.placement
        return ServiceInfo(
            service=SERVICE_NAME, version=__version__, status=self._status(), model=self.settings.base_model_id,
            adapter=self._adapter(), device=placement.device if placement else None,
            dtype=self.runner.engine.loaded.placement.dtype_name if self.runner.engine is not None else None,
        )
