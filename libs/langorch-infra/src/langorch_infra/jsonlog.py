"""JSON-lines logging (api.md §1.3): one JSON object per record, with the request fields a record carries
(``extra=``) and the current trace id."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from langorch_infra import tracing

FIELDS = ("request_id", "trace_id", "actor", "method", "route", "path", "status", "duration_ms")


class JsonLines(logging.Formatter):
    """``{"ts", "level", "logger", "message", <FIELDS present on the record>, "exc"?}``; ``trace_id`` defaults to
    the trace of the span current where the record was logged."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for name in FIELDS:
            if name in record.__dict__:
                out[name] = record.__dict__[name]
        if "trace_id" not in out and (trace_id := tracing.current_trace_id()) is not None:
            out["trace_id"] = trace_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def install(logger_name: str, stream: TextIO | None = None) -> logging.Handler:
    """Log ``logger_name`` and its children as JSON lines on ``stream`` (stderr) only, not through the root
    handlers (idempotent: a second call returns the first handler)."""
    logger = logging.getLogger(logger_name)
    for handler in logger.handlers:
        if isinstance(handler.formatter, JsonLines):
            return handler
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLines())
    logger.addHandler(handler)
    logger.propagate = False
    return handler
