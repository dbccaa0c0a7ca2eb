"""Application factory: cheap to import; the model loads in the background once the server runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import SERVICE_NAME, __version__
from app.http.access_log import AccessLogMiddleware
from app.http.chat_routes import router as openai_router
from app.http.docs import add_schemas, declare_api_key, drop_validation_responses, install_docs
from app.http.envelope import install_error_handlers
from app.http.gate import InferGate
from app.http.job_routes import router as jobs_router
from app.http.request_id import RequestIdMiddleware
from app.http.routes import router
from app.jobs.runtime import JobSystem
from app.request_context import install_log_record_factory
from app.service.chat_schemas import ChatCompletionRequest
from app.service.inference import InferenceService
from app.service.runner import ABORT_FLUSH_S, shutdown_error
from app.settings import Settings, load_settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, service: InferenceService | None = None) -> FastAPI:
    """Build the app. Pass ``service`` to inject a fake engine/runner in tests."""
    settings = settings or (service.settings if service else load_settings())
    install_log_record_factory()
    service = service or InferenceService(settings)

    jobs = JobSystem(settings, service.runner, service.run_job, service.prometheus)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await jobs.start()  # jobs are accepted from the first request, while the model loads
        # Load in the background: the port answers /health (503 loading) while weights load.
        loading = asyncio.create_task(service.start(), name="model-load")
        try:
            yield
        finally:
            service.runner.begin_drain()
            if not await service.runner.wait_idle(settings.shutdown_grace_s):
                logger.warning("shutdown grace period (%.0f s) over with requests still running: answering them 503",
                               settings.shutdown_grace_s)
                service.runner.abort(shutdown_error())
                await service.runner.wait_idle(ABORT_FLUSH_S)
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await jobs.stop()  # jobs still running here go back to the queue, for any replica
            service.close()

    app = FastAPI(
        title=SERVICE_NAME,
        version=__version__,
        description="Turns a picture of a process diagram (BPMN, swimlanes, flowcharts) into a markdown table "
        "of its steps and roles, with Qwen3-VL and a merged LoRA adapter.",
        lifespan=lifespan,
        docs_url=None,  # served from local assets below
        redoc_url=None,  # ReDoc would load from a CDN too
    )
    app.state.service = service
    app.state.jobs = jobs
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(openai_router)
    app.include_router(jobs_router)
    install_docs(app)
    add_schemas(app, ChatCompletionRequest)
    drop_validation_responses(app)
    if settings.api_key:
        declare_api_key(app, [("/infer", "post"), ("/v1/chat/completions", "post"), ("/v1/models", "get"),
                              ("/v1/models/{model_id}", "get"), ("/jobs", "post"), ("/jobs/{job_id}", "get"),
                              ("/jobs/{job_id}", "delete"), ("/jobs/{job_id}/result", "get")]
                        + ([("/metrics", "get")] if settings.metrics_require_key else []))
    # Added last = outermost: the request id exists before the access log and the gate run.
    app.add_middleware(InferGate, service_getter=lambda: app.state.service)
    app.add_middleware(AccessLogMiddleware, metrics_getter=lambda: app.state.service.prometheus)
    app.add_middleware(RequestIdMiddleware)
    if settings.cors_origins.strip():
        # Outermost, so preflights and refusals (401, 503) carry the CORS headers a browser needs to read them.
        origins = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST", "HEAD", "DELETE"],
                           allow_headers=["*"],
                           expose_headers=["X-Request-ID", "Retry-After"])
    return app
