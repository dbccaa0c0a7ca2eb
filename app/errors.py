"""The service's error taxonomy: each ServiceError fixes one HTTP status and one machine-readable type; a
ModelLoadError is a load that cannot succeed."""

from __future__ import annotations


class ModelLoadError(Exception):
    """The model or adapter cannot be served; the message says what to fix, on one line (/health's reason)."""


class ServiceError(Exception):
    """Base of every error a client may see. ``message`` is safe to show; internals never go in it."""

    status_code = 500
    error_type = "internal_error"
    default_message = "internal error; the request id is in the service log"

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None,
                 param: str | None = None):
        super().__init__(message or self.default_message)
        self.message = message or self.default_message
        self.headers = headers or {}
        self.param = param  # the request field at fault, for the OpenAI-shaped error


class InvalidRequestError(ServiceError):
    status_code, error_type = 400, "invalid_request"


class InvalidImageError(ServiceError):
    status_code, error_type = 400, "invalid_image"


class ImageURLNotAllowedError(ServiceError):
    status_code, error_type = 400, "image_url_not_allowed"


class ImageFetchError(ServiceError):
    status_code, error_type = 400, "image_fetch_failed"


class UnauthorizedError(ServiceError):
    status_code, error_type = 401, "unauthorized"
    default_message = "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


class NotFoundError(ServiceError):
    status_code, error_type = 404, "not_found"


class ModelNotFoundError(ServiceError):
    status_code, error_type = 404, "model_not_found"


class JobNotFoundError(ServiceError):
    status_code, error_type = 404, "job_not_found"
    default_message = "no such job (never submitted, forgotten, or its result expired after JOB_TTL_S)"


class JobNotDoneError(ServiceError):
    status_code, error_type = 409, "job_not_done"


class MethodNotAllowedError(ServiceError):
    status_code, error_type = 405, "method_not_allowed"


class PayloadTooLargeError(ServiceError):
    status_code, error_type = 413, "payload_too_large"


class UploadTimeoutError(ServiceError):
    status_code, error_type = 408, "upload_timeout"


class UnsupportedMediaError(ServiceError):
    status_code, error_type = 415, "unsupported_media_type"


class MissingFieldError(ServiceError):
    status_code, error_type = 422, "missing_field"


class NoTableError(ServiceError):
    status_code, error_type = 422, "no_table"


class NotReadyError(ServiceError):
    status_code, error_type = 503, "not_ready"


class OverloadedError(ServiceError):
    status_code, error_type = 503, "overloaded"


class JobStoreUnavailableError(ServiceError):
    """The job store could not be reached or answered within JOB_STORE_TIMEOUT_S: only the job routes see it."""

    status_code, error_type = 503, "job_store_unavailable"


class DeadlineExceededError(ServiceError):
    status_code, error_type = 504, "timeout"


class ClientClosedError(ServiceError):
    """The client went away before the answer (nginx's 499); only logs and metrics ever see it."""

    status_code, error_type = 499, "client_closed_request"


def recorded_error(status_code: int, error_type: str, message: str) -> ServiceError:
    """An error recorded earlier (a failed job's), answered again with its own status and type."""
    error = ServiceError(message)
    error.status_code, error.error_type = status_code, error_type
    return error


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``, for /health reasons and logs that must stay one line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
