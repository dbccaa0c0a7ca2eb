"""Typed service settings, read from the environment and validated at startup."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PROMPT = (
    "Извлеки из диаграммы бизнес-процесса все действия (шаги) и роли (исполнителей). "
    "Верни только таблицу в формате markdown с колонками: № | Наименование действия | Роль. "
    "Перечисли действия в порядке их выполнения по диаграмме."
)
DEMO_MODEL_ID = "demo"


class Device(str, Enum):
    auto = "auto"
    cuda = "cuda"
    mps = "mps"
    cpu = "cpu"


class TorchDType(str, Enum):
    auto = "auto"
    float16 = "float16"
    bfloat16 = "bfloat16"
    float32 = "float32"


class Quantization(str, Enum):
    none = "none"
    int8 = "int8"
    int4 = "int4"


class LogLevel(str, Enum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class LogFormat(str, Enum):
    text = "text"
    json = "json"


class Settings(BaseSettings):
    """Every knob of the service. Environment variable = field name in upper case."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", use_enum_values=False)

    base_model_id: str = Field("Qwen/Qwen3-VL-2B-Instruct", min_length=1,
                               description="Hub id or local folder of the base model; 'demo' = offline tiny model")
    model_revision: str | None = Field(None, description="branch, tag or commit of a Hub model")
    adapter_path: Path = Field(Path("/app/models/weights"), description="folder of the LoRA adapter")
    require_adapter: bool = Field(True, description="no adapter at ADAPTER_PATH fails the load; false serves the "
                                                    "base model on purpose")
    device: Device = Device.auto
    device_strict: bool = Field(False, description="a DEVICE that cannot be used fails the load instead of "
                                                   "falling back to the CPU")
    torch_dtype: TorchDType = TorchDType.auto
    quantization: Quantization = Field(
        Quantization.none, description="int8: int8 language-model weights (CPU: for decoding; CUDA: bitsandbytes); int4: 4-bit "
                           "language-model weights for decoding (CPU only)")
    max_new_tokens: int = Field(384, ge=1, le=8192, description="cap on generated tokens per request")
    prompt: str = Field(DEFAULT_PROMPT, min_length=1)
    host: str = "0.0.0.0"
    port: int = Field(8002, ge=1, le=65535)
    log_level: LogLevel = LogLevel.INFO
    log_format: LogFormat = Field(LogFormat.text, description="text for local runs; the container sets json")
    max_queue: int = Field(8, ge=0, le=10_000, description="admitted requests allowed beyond one per KV slot; "
                                                          "more are refused at once (503 overloaded)")
    max_batch_size: int | None = Field(None, ge=1, le=256,
                                       description="KV-cache slots = requests decoded together; "
                                                   "unset: 32 on CUDA, 8 elsewhere")
    max_prompt_tokens: int = Field(1024, ge=64, le=16_384,
                                   description="text tokens of a prompt (chat template included) besides the "
                                               "image; sizes each KV slot, longer prompts get 400")
    prefill_token_budget: int = Field(8192, ge=256, le=262_144,
                                      description="padded prompt tokens prefilled together in one scheduler "
                                                  "step while no request is decoding")
    decoding_prefill_token_budget: int = Field(4096, ge=256, le=262_144,
                                               description="the same while requests are decoding (each prefill "
                                                           "pauses them all): bounds the gap between their tokens")
    cuda_graphs: bool = Field(True, description="replay the decoding step as CUDA graphs (CUDA only)")
    max_image_tokens: int = Field(1024, ge=4, le=16_384,
                                  description="vision-token budget per image (one token per 32x32 px)")
    max_pages: int = Field(20, ge=1, le=1000, description="pages one /infer request may ask for (pages=...); "
                                                          "more: 413")
    max_decoded_pixels: int = Field(50_000_000, ge=10_000, description="decompression-bomb limit, in pixels")
    decode_workers: int = Field(2, ge=1, le=64, description="processes that decode uploads")
    max_upload_mb: float = Field(20.0, gt=0, le=1024, description="largest accepted upload body, in MiB")
    upload_timeout_s: float = Field(60.0, gt=0, description="a request body must arrive in full within this")
    max_uploads: int = Field(32, ge=1, le=10_000,
                             description="request bodies being received at once (beyond: 503); they hold no "
                                         "generation place, and at most MAX_UPLOADS x MAX_UPLOAD_MB of memory")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection must send a request's headers within "
                                                            "this, and idle keep-alive connections close after it")
    max_connections: int = Field(1000, ge=8, le=1_000_000, description="open connections at once; past it the "
                                 "one slowest to send its request is closed to make room (keep it under the "
                                 "process's file limit, ulimit -n)")
    decode_timeout_s: float = Field(5.0, gt=0, description="longest a file may take to decode; past it: 400 and "
                                                           "its decoder worker is replaced")
    request_timeout_s: float = Field(300.0, gt=0, description="per-request deadline, queue wait included")
    shutdown_grace_s: float = Field(30.0, ge=0, description="how long in-flight requests may finish on SIGTERM")
    api_key: str | None = Field(None, description="when set, /infer requires it")
    metrics_require_key: bool = Field(False, description="also require API_KEY on /metrics")
    served_model_name: str = Field("", description="the model id of /v1/models and the OpenAI-compatible API; "
                                   "empty: BASE_MODEL_ID+lora-<adapter digest>")
    allowed_image_hosts: str = Field("", description="comma-separated hosts whose http(s) image URLs "
                                     "/v1/chat/completions may fetch ('*.example.com' for subdomains); empty: "
                                     "none, images come as data: URLs")
    image_fetch_timeout_s: float = Field(10.0, gt=0, description="longest an allowed image URL may take to fetch")
    jobs_db: str = Field(str(Path.home() / ".cache" / "vlm-inference" / "jobs.sqlite3"),
                         description="the job store: an SQLite file (one host; put it on a volume so jobs survive "
                                     "the container), or postgresql://user:password@host:5432/db, shared by "
                                     "replicas on many machines")
    job_ttl_s: float = Field(86_400.0, gt=0, description="how long a finished job's result is kept")
    job_timeout_s: float = Field(3600.0, gt=0, description="a job's deadline, from its start (REQUEST_TIMEOUT_S is "
                                                           "for synchronous requests)")
    max_jobs: int = Field(100, ge=1, le=100_000, description="jobs queued or running at once; more get 503")
    job_lease_s: float = Field(60.0, ge=2, le=3600, description="a running job's lease, renewed every second while "
                               "its replica lives: a replica that dies gives its jobs up within about this")
    max_job_attempts: int = Field(3, ge=1, le=100, description="times a job may lose its replica (killed, lease "
                                  "lost) before it ends failed instead of running again")
    job_concurrency: int | None = Field(None, ge=0, le=256, description="jobs one replica runs at once; unset: its "
                                        "KV slots; 0: this replica answers the job routes but runs no job")
    job_store_timeout_s: float = Field(5.0, gt=0, le=120, description="longest a job route waits on the store "
                                       "(locked, slow, unreachable) before answering 503")
    max_result_mb: float = Field(16.0, gt=0, le=1024, description="largest answer a job may store; a larger one "
                                 "fails the job with 413")
    job_callback_hosts: str = Field("", description="comma-separated hosts a job's callback_url may name "
                                    "('host', 'host:port', '*.example.com'); empty: callbacks are refused")
    job_callback_secret: str | None = Field(None, description="signs each callback: X-VLM-Signature = "
                                            "sha256=HMAC-SHA256(secret, '<X-VLM-Timestamp>.' + body)")
    cors_origins: str = Field("", description="comma-separated origins allowed to call the API from a browser "
                                              "page ('*' for any); empty: none")
    force_max_new_tokens: bool = Field(False, description="benchmarks only: never stop before max_new_tokens")
    repetition_guard: bool = Field(True, description="stop generation that degenerates into repetition")
    warmup: bool = Field(True, description="run one generation before reporting ready")
    demo_dir: Path = Field(Path.home() / ".cache" / "vlm-inference" / "demo",
                           description="where BASE_MODEL_ID=demo builds the tiny model")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("jobs_db", mode="before")
    @classmethod
    def _path_as_text(cls, value: object) -> object:
        return str(value) if isinstance(value, Path) else value

    @field_validator("api_key", "model_revision", "job_callback_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def is_demo(self) -> bool:
        return self.base_model_id == DEMO_MODEL_ID

    def explicitly_set(self, name: str) -> bool:
        """True when the operator set this field (environment or constructor), not left it at its default."""
        return name in self.model_fields_set


# Settings that existed once and no longer do anything; set in the environment, they get a warning at startup.
REMOVED_SETTINGS = {
    "BATCH_WAIT_MS": "requests join the running batch at the next decoding step, no wait is needed",
    "TORCH_COMPILE": "the decoding step is replayed as CUDA graphs (CUDA_GRAPHS)",
}


def removed_settings_in(environ: dict[str, str]) -> list[str]:
    """One warning line per removed setting found in ``environ``."""
    return [f"{name} is no longer used: {why}" for name, why in REMOVED_SETTINGS.items()
            if name in {key.upper() for key in environ}]


class SettingsError(Exception):
    """The environment holds an invalid setting; the message is one readable line per problem."""


def describe_validation_error(error: ValidationError) -> str:
    """Turn pydantic's error into lines like: invalid DEVICE='gpu': Input should be 'auto', 'cuda', ..."""
    lines = []
    for item in error.errors():
        name = "_".join(str(part) for part in item["loc"]).upper() or "settings"
        lines.append(f"invalid {name}={item.get('input')!r}: {item['msg']}")
    return "\n".join(lines)


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment (overrides win); raise SettingsError with a readable message."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(describe_validation_error(error)) from None
