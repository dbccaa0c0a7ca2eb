"""Prometheus metrics in the service's own registry. Names prefixed vlm_, base units, bounded labels."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

# Diagram requests take seconds to minutes: buckets from 50 ms to 10 min.
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600)
FAST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 8192)
ENDPOINTS = ("/infer", "/v1/chat/completions", "/v1/models", "/jobs", "/health", "/metrics", "/", "/docs",
             "/openapi.json")
FINISH_REASONS = ("stop", "length", "repetition", "timeout", "cancelled")


def endpoint_label(path: str) -> str:
    """Bounded label values: unknown paths (404 probes) all count as 'other'."""
    if path.startswith("/v1/models/"):
        return "/v1/models"
    if path.startswith("/jobs/"):
        return "/jobs"
    return path if path in ENDPOINTS else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.requests = Counter("vlm_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.request_duration = Histogram("vlm_request_duration_seconds",
                                          "Time to answer an inference request, end to end (a stream: to its "
                                          "last event)", ["route"], buckets=SECONDS_BUCKETS, registry=registry)
        self.queue_wait = Histogram("vlm_queue_wait_seconds", "Time an inference request waited for a KV slot",
                                    buckets=SECONDS_BUCKETS, registry=registry)
        self.preprocess = Histogram("vlm_preprocess_duration_seconds",
                                    "Decoding the upload and building model inputs", buckets=FAST_BUCKETS,
                                    registry=registry)
        self.first_token = Histogram("vlm_time_to_first_token_seconds",
                                     "Prefill: from its start to the first token (vision encoder included)",
                                     buckets=SECONDS_BUCKETS, registry=registry)
        self.time_per_output_token = Histogram(
            "vlm_time_per_output_token_seconds", "Decoding time per generated token after the first, per request",
            buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5),
            registry=registry)
        self.generation = Histogram("vlm_generation_duration_seconds", "From prefill start to the last token",
                                    buckets=SECONDS_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("vlm_prompt_tokens", "Prompt tokens (image tokens included)",
                                     registry=registry)
        self.image_tokens = Counter("vlm_image_tokens", "Vision tokens fed to the model", registry=registry)
        self.generated_tokens = Counter("vlm_generated_tokens", "Tokens generated", registry=registry)
        self.image_tokens_per_request = Histogram("vlm_image_tokens_per_request", "Vision tokens per request",
                                                  buckets=TOKEN_BUCKETS, registry=registry)
        self.generated_tokens_per_request = Histogram("vlm_generated_tokens_per_request",
                                                      "Generated tokens per request", buckets=TOKEN_BUCKETS,
                                                      registry=registry)
        self.finish_reasons = Counter("vlm_finish_reason", "Why generation ended", ["reason"], registry=registry)
        self.inference_duration = Histogram("vlm_inference_duration_seconds",
                                            "Answered inference requests: from admission to the answer",
                                            buckets=SECONDS_BUCKETS, registry=registry)
        self.rejected = Counter("vlm_rejected_requests", "Inference requests refused at the door, before admission "
                                "(wrong key, body too large or too slow, not ready, overloaded), or overloaded once "
                                "admitted (JSON schemas waiting to compile)", ["route", "reason"], registry=registry)
        self.failed = Counter("vlm_failed_requests", "Admitted inference requests the service failed: 5xx (deadline, "
                              "shutdown, internal or device error); alert on this one", ["route", "reason"],
                              registry=registry)
        self.client_errors = Counter("vlm_client_error_requests", "Admitted inference requests refused for what "
                                     "the client sent: 4xx (a bad file, a prompt too long, no table)",
                                     ["route", "reason"], registry=registry)
        self.jobs = Gauge("vlm_jobs", "Jobs in the job store, by status: the store's own count, so every replica "
                          "sharing the store exports the same number (read it with max by (store), never sum)",
                          ["status", "store"], registry=registry)
        self.job_store_up = Gauge("vlm_job_store_up", "1 while the job store answers this replica, else 0",
                                  registry=registry)
        self.job_results_discarded = Counter(
            "vlm_job_results_discarded", "Job outcomes this replica computed but did not write, having lost the job "
            "(cancelled, forgotten, or claimed again after its lease passed)", registry=registry)
        self.job_duration = Histogram("vlm_job_duration_seconds", "Jobs this replica ran, from their start to "
                                      "the end it wrote, by how they ended", ["status"], buckets=SECONDS_BUCKETS, registry=registry)
        self.queue_depth = Gauge("vlm_queue_depth", "Admitted inference requests, or pages of one (a job's "
                                 "included), waiting for a KV slot on this replica",
                                 registry=registry)
        self.in_flight = Gauge("vlm_in_flight_requests", "Inference requests holding a KV slot", registry=registry)
        self.slots_in_use = Gauge("vlm_kv_slots_in_use", "KV-cache slots held by requests", registry=registry)
        self.slots = Gauge("vlm_kv_slots", "KV-cache slots allocated (MAX_BATCH_SIZE)", registry=registry)
        self.decode_mode = Gauge("vlm_decode_mode", "1 for the decoding path serving, 0 for the others (the "
                                 "fastest that passed its startup check; /health decode_fallback says why)",
                                 ["mode"], registry=registry)
        self.model_load = Gauge("vlm_model_load_seconds", "Seconds the model took to load, merge and warm up",
                                registry=registry)
        self.model_info = Gauge("vlm_model_info", "The model being served (value is always 1)",
                                ["model", "adapter", "device", "dtype"], registry=registry)
        self.device_fallback = Gauge("vlm_device_fallback", "1 when the DEVICE asked for could not be used and "
                                     "the model runs on the CPU instead", registry=registry)
        self.gpu_allocated = Gauge("vlm_gpu_memory_allocated_bytes", "CUDA memory held by tensors",
                                   registry=registry)
        self.gpu_reserved = Gauge("vlm_gpu_memory_reserved_bytes", "CUDA memory reserved by the allocator",
                                  registry=registry)
        for reason in FINISH_REASONS:  # export zeros, so rate() works from the first scrape
            self.finish_reasons.labels(reason)

    @staticmethod
    def total(metric: Counter | Histogram, sample: str = "_total") -> float:
        """One sample of a metric summed over its labels: a counter's ``_total``, a histogram's ``_count`` or
        ``_sum``. The JSON view of /metrics reads its numbers here, so both views always agree."""
        return sum(value.value for family in metric.collect() for value in family.samples
                   if value.name.endswith(sample))

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition in the format ``accept`` asks for (OpenMetrics or text 0.0.4)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


def wants_prometheus(accept: str, format_param: str | None) -> bool:
    """Prometheus servers send text/plain or application/openmetrics-text; browsers and curl get JSON."""
    if format_param:
        return format_param.lower() in ("prometheus", "openmetrics", "text")
    accept = accept.lower()
    return "text/plain" in accept or "application/openmetrics-text" in accept


def cuda_in_use() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def gpu_memory_bytes() -> tuple[int, int]:
    """(allocated, reserved) bytes on the current CUDA device; zeros without CUDA."""
    import torch

    if not cuda_in_use():
        return 0, 0
    return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
