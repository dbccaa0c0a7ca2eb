"""Logging set-up: one stream for our loggers and uvicorn's, as text or JSON lines, each with its request id."""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone

from app.request_context import install_log_record_factory
from app.settings import LogFormat, Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, plus access fields if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        access = getattr(record, "access", None)
        if access:
            entry.update(access)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


# C0 controls (CR, LF, ESC for ANSI sequences, ...) and DEL: in a text log they would start forged lines or
# rewrite the terminal. A request path or header can carry them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def escape_controls(text: str) -> str:
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        # One record, one line; a traceback, appended after this by format(), keeps its own lines.
        line = escape_controls(super().formatMessage(record))
        access = getattr(record, "access", None)
        if access:
            extras = {k: v for k, v in access.items() if k not in ("method", "path", "status", "duration_s")}
            line += escape_controls("".join(f" {k}={v}" for k, v in extras.items()))
        return line


def configure_logging(settings: Settings) -> None:
    install_log_record_factory()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if settings.log_format == LogFormat.json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.value)
    # uvicorn's loggers go through the same handler; its access log is replaced by ours (app.access).
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    for noisy in ("httpx", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # peft imports bitsandbytes, whose CPU backend warns on every start that an optional 4-bit kernel package is
    # missing; the service never uses 4-bit layers, so that warning would only mislead an operator.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Library warnings and progress bars would break the one-object-per-line stream.
    logging.captureWarnings(True)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    # transformers and huggingface_hub (imported just above) attach their own stderr handlers at import: their
    # records (the Hub client's retries, load warnings) would print as plain text, some twice. They go through
    # ours instead.
    for library in ("transformers", "huggingface_hub"):
        logger = logging.getLogger(library)
        logger.handlers[:] = []
        logger.propagate = True
