"""Log lines that say what they are about: KBSTREAM_LOG_FORMAT=json writes one
JSON object per line (python-json-logger) with the stage, document, version
and event id a stage loop is working on (set by infra/kafka/observe.py in
LOG_CONTEXT, a contextvar, so each thread carries its own)."""

from __future__ import annotations

import contextvars
import logging
from typing import Any

LogContext = dict[str, Any]
LOG_CONTEXT: contextvars.ContextVar[LogContext | None] = contextvars.ContextVar(
    "kbstream_log_context", default=None
)
CONTEXT_FIELDS = ("stage", "document", "version", "event_id")


class ContextFilter(logging.Filter):
    """Copies the current log context onto each record (as ``extra=`` would)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (LOG_CONTEXT.get() or {}).items():
            if value is not None and not hasattr(record, key):
                setattr(record, key, value)
        return True


def json_formatter() -> logging.Formatter:
    """time, level, logger, thread, message, the context fields when set, any
    ``extra=`` fields, and the exception as text."""
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        "{asctime}{levelname}{name}{threadName}{message}",
        style="{",
        rename_fields={
            "asctime": "time",
            "levelname": "level",
            "name": "logger",
            "threadName": "thread",
            "exc_info": "exception",
        },
        json_ensure_ascii=False,
    )


def formatter(kind: str, text_format: str) -> logging.Formatter:
    return json_formatter() if kind == "json" else logging.Formatter(text_format)
