"""Logging of every LangOrch process: one setup for ``langorch serve <service>``, ``langorch up`` and its workers.

Two formats (``LANGORCH_LOG_FORMAT``): ``json``, one JSON object per line for log collectors, and ``console``,
rich text for a person at a terminal. A JSON line carries ``timestamp`` (RFC 3339, UTC), ``level``, ``logger``,
``message``, ``service``, ``trace_id`` and ``span_id`` of the span current where the record was logged, the
fields bound with :func:`fields` (``run_id``, ``procedure_id``, ``command_id``), any ``extra=`` of the call (the
gateway's access log: ``request_id``, ``actor``, ``method``, ``route``, ``path``, ``status``, ``duration_ms``)
and ``exc_info``, the formatted traceback.

``service`` is the service a record was logged for: :func:`serve_as` binds it for everything a service's task
does (in ``langorch up`` one process hosts several), else the process's own name given to :func:`setup`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from collections.abc import Awaitable, Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import IO, Any, Literal, TypeVar

from opentelemetry import trace
from opentelemetry.trace import format_span_id, format_trace_id

T = TypeVar("T")
LogFormat = Literal["json", "console"]

# attributes every LogRecord has (and asyncio's taskName, uvicorn's color_message): never copied as fields
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"taskName", "color_message",
                                                                                "message", "asctime"}
# loggers chatty at INFO whose news an operator does not need
QUIET_LOGGERS = ("nats", "httpx", "uvicorn.access")

_fields: ContextVar[Mapping[str, str]] = ContextVar("langorch_log_fields", default=MappingProxyType({}))


@contextlib.contextmanager
def fields(**values: str | None) -> Iterator[None]:
    """Add ``values`` (None ones skipped) to every record logged inside the block, in this task and the tasks it
    starts."""
    token = _fields.set({**_fields.get(), **{k: v for k, v in values.items() if v is not None}})
    try:
        yield
    finally:
        _fields.reset(token)


def bind(**values: str | None) -> None:
    """Add ``values`` for the rest of the enclosing :func:`fields` block (or of the current task)."""
    _fields.set({**_fields.get(), **{k: v for k, v in values.items() if v is not None}})


async def serve_as(service: str, work: Awaitable[T]) -> T:
    """Await ``work`` (a service's ``serve()``) with every record it logs marked ``service``; run it as a task
    of its own, so that the mark stays in it."""
    bind(service=service)
    return await work


def current_fields() -> dict[str, str]:
    """The bound fields and the current span's ``trace_id`` and ``span_id`` (when a span is recording)."""
    out = dict(_fields.get())
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        out["trace_id"] = format_trace_id(context.trace_id)
        out["span_id"] = format_span_id(context.span_id)
    return out


class JsonLines(logging.Formatter):
    """A record as one JSON object (see the module); ``service`` defaults to ``service`` of the process."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
            "service": self.service}
        out.update(current_fields())
        out.update((k, v) for k, v in vars(record).items() if k not in _RECORD_ATTRS)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = record.stack_info
        return json.dumps(out, default=str, ensure_ascii=False)


class LineLogger(io.StringIO):
    """A text stream whose lines become INFO records of ``logger``: what a command prints for a person (``langorch
    up``'s banner) is a log line like the others where logs are JSON."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger
        self.pending = ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if line.strip():
                self.logger.info(line.rstrip())
        return len(text)


class _ConsoleFields(logging.Filter):
    """Console lines end with the run, procedure and command they are about."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _fields.get()
        shown = " ".join(f"{k}={bound[k]}" for k in ("run_id", "procedure_id", "command_id") if k in bound)
        record.context = f"  [{shown}]" if shown else ""
        return True


def handler(fmt: LogFormat, service: str, stream: IO[str] | None = None) -> logging.Handler:
    """A handler writing ``fmt`` lines to ``stream`` (stderr)."""
    out = stream or sys.stderr
    if fmt == "json":
        json_handler = logging.StreamHandler(out)
        json_handler.setFormatter(JsonLines(service))
        return json_handler
    from rich.console import Console
    from rich.logging import RichHandler

    console_handler = RichHandler(console=Console(file=out), show_path=False)
    console_handler.setFormatter(logging.Formatter("%(name)s: %(message)s%(context)s", datefmt="[%X]"))
    console_handler.addFilter(_ConsoleFields())
    return console_handler


def choose_format(configured: LogFormat | None, *, terminal_default: bool, stream: IO[str] | None = None) -> LogFormat:
    """``configured`` if set; else ``console`` when ``terminal_default`` and ``stream`` (stderr) is a terminal,
    ``json`` otherwise (containers, services, pipes)."""
    if configured is not None:
        return configured
    out = stream or sys.stderr
    return "console" if terminal_default and out.isatty() else "json"


def setup(service: str, *, terminal_default: bool = False, stream: IO[str] | None = None) -> LogFormat:
    """Log every record of this process at ``LANGORCH_LOG_LEVEL`` and up in ``LANGORCH_LOG_FORMAT`` to ``stream``
    (stderr), the process being ``service``; ``terminal_default``: console text when that is a terminal (``langorch
    up``). Replaces what a previous call installed; returns the format chosen."""
    from langorch_infra.settings import CommonSettings

    settings = CommonSettings()
    fmt = choose_format(settings.log_format, terminal_default=terminal_default, stream=stream)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "langorch", False)]:
        root.removeHandler(old)
    new = handler(fmt, service, stream)
    new.langorch = True  # type: ignore[attr-defined]
    root.addHandler(new)
    root.setLevel(settings.log_level.upper())
    for name in QUIET_LOGGERS:  # unless debugging
        logging.getLogger(name).setLevel(logging.WARNING if root.level > logging.DEBUG else logging.NOTSET)
    logging.captureWarnings(True)  # a library's warning is a record too, not a bare line on stderr
    return fmt
