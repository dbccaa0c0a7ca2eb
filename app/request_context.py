"""The current request's id, readable from any layer (the service's answers, every log record) without
passing it through every call. Set by the HTTP layer's request-id middleware."""

from __future__ import annotations

import contextvars
import logging

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    return request_id_var.get()


_factory_installed = False


def install_log_record_factory() -> None:
    """Give every log record, from any logger, ``record.request_id`` ("-" outside a request). Idempotent."""
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = request_id_var.get() or "-"
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True
