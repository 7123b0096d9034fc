"""``langorch``: start the platform, run one service, run a procedure and follow it, rebuild projections.

Errors and exit codes
---------------------
Every command reports a user error as one line on stderr that starts with ``error:`` and names the file, URL or
option at fault, never with a traceback; an error answer of the API adds one line per field error, and the
compile diagnostics of a rejected import are shown on their source lines like ``langorch validate`` does.
``langorch --debug <command>`` (or ``LANGORCH_DEBUG=1``) prints the full traceback before that line and exits
with the same code. An unexpected exception (a bug) is reported as ``error: internal error: ...`` and exit 1.

Exit codes, the same for every command:

* ``0`` success.
* ``1`` the command's work failed: a procedure was rejected (``validate``, ``explain``, ``graph``, ``run``), a
  run ended other than ``completed``, ``explain --var`` values failed the procedure's input validation, the API
  answered with an error (a problem response, printed with its title, detail and field errors) or with
  something that is not the LangOrch API's JSON; also an internal error.
* ``2`` usage error, nothing was attempted: a bad option or argument, an input file that is missing, a
  directory, unreadable, empty or not JSON (named with the line:column of the JSON error), a ``--var`` without
  ``=``, an API URL that is not ``http(s)://``, an invalid ``LANGORCH_*`` setting.
* ``3`` a server could not be reached: the LangOrch API (connection refused, unknown host, time-out; is
  ``langorch up`` running? ``--api`` / ``LANGORCH_API_URL`` name it), NATS or PostgreSQL (``serve``,
  ``projections rebuild``, ``up`` with ``LANGORCH_NATS_URL`` / ``LANGORCH_DATABASE_URL``; named without the
  password). After a time-out the outcome of the request is unknown.
* ``130`` interrupted (Ctrl-C).

``validate`` checks files, so a file that is empty or not JSON is one of its findings: that file is reported
rejected with its diagnostic (exit 1); a missing or unreadable file is a usage error there too (exit 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from langorch import accounts, cli_cluster, cli_triggers, cli_webhook, timeline
from langorch.errors import API_HELP, API_KEY_HELP, DEFAULT_API, EXIT_CODES_HELP, CLIError, ExitCode, read_file
from langorch.serving import SERVICES, serve_until_stopped


class _State:
    debug = False
    command: str | None = None


_STATE = _State()


class _Root(TyperGroup):
    """The ``langorch`` group: the one place where exceptions become error lines and exit codes."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort, BrokenPipeError):
            raise  # usage errors, explicit exits and a closed stdout: typer's own handling
        except Exception as exc:  # every other failure becomes one error line and its exit code
            code = report(exc, debug=bool(ctx.params.get("debug")) or _STATE.debug)
            raise typer.Exit(code) from None


app = typer.Typer(cls=_Root, help="LangOrch: durable orchestration of CKP procedures.", no_args_is_help=True,
                  pretty_exceptions_enable=False, epilog=EXIT_CODES_HELP)
projections_app = typer.Typer(help="Maintain the PostgreSQL projections.", no_args_is_help=True,
                              epilog=EXIT_CODES_HELP)
app.add_typer(projections_app, name="projections")
console = Console()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", envvar="LANGORCH_DEBUG",
                                        help="Show full tracebacks instead of one-line error messages.")] = False,
) -> None:
    _STATE.debug = debug
    _STATE.command = ctx.invoked_subcommand
    from langorch_infra import stacks

    stacks.answer_early()  # SIGUSR1 while starting: the stacks, not the end of the process


# -- errors --------------------------------------------------------------------------------------------------


def redact(url: str) -> str:
    """``url`` without its password (a NATS URL's user part can be a token: hidden too), nor a ``password``
    query parameter; each URL of a comma-separated list of NATS seed servers."""
    if url.count("://") > 1:
        return ",".join(redact(part) for part in url.split(","))
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user, has_password, _ = userinfo.partition(":")
            hidden = parts.scheme.startswith(("nats", "tls", "ws")) and not has_password
            netloc = f"{'***' if hidden else user}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if k.lower() in ("password", "passfile", "token") else v)
                               for k, v in pairs], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<invalid URL>"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _reason(exc: BaseException) -> str:
    """Why a connection failed, in a few words (from the innermost OS error when there is one)."""
    import socket

    for e in _chain(exc):
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return f"host name not resolved: {e.strerror}"
        if isinstance(e, TimeoutError):
            return "timed out"
        if isinstance(e, OSError) and e.strerror:
            return e.strerror.lower()
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


_PG_CONNECTION_ERRORS = {"PostgresConnectionError", "ConnectionDoesNotExistError", "CannotConnectNowError",
                         "InvalidPasswordError", "InvalidAuthorizationSpecificationError", "InvalidCatalogNameError",
                         "ClientConfigurationError", "TooManyConnectionsError", "OperationalError",
                         "ConnectionTimeout", "PoolTimeout"}
_NATS_CONNECTION_ERRORS = {"NoServersError", "ConnectionClosedError", "StaleConnectionError",
                           "UnexpectedEOF", "AuthorizationError", "SecureConnRequiredError"}


def _library_of(exc: BaseException) -> str | None:
    """``"PostgreSQL"`` or ``"NATS"`` when ``exc`` is a connection failure of asyncpg/psycopg or nats-py."""
    module = type(exc).__module__
    name = type(exc).__name__
    if module.startswith(("asyncpg", "psycopg")) and name in _PG_CONNECTION_ERRORS:
        return "PostgreSQL"
    if module.startswith("nats") and name in _NATS_CONNECTION_ERRORS:
        return "NATS"
    if isinstance(exc, OSError | TimeoutError) and getattr(exc, "filename", None) is None:
        files = [frame.f_code.co_filename for frame, _ in traceback.walk_tb(exc.__traceback__)]
        for filename in reversed(files):  # the innermost library frame decides
            if f"{os.sep}asyncpg{os.sep}" in filename or f"{os.sep}psycopg" in filename:
                return "PostgreSQL"
            if f"{os.sep}nats{os.sep}" in filename:
                return "NATS"
    return None


def dependency_of(exc: BaseException) -> str | None:
    """Which server ``exc`` (or an exception it was raised from) failed to connect to, if any."""
    for e in _chain(exc):
        found = _library_of(e)
        if found:
            return found
    return None


def _configured_url(kind: str) -> str | None:
    """The URL of ``kind`` (NATS or PostgreSQL) the running command uses, without its password; None when it
    cannot be told (``up`` with embedded servers)."""
    field = "nats_url" if kind == "NATS" else "database_url"
    url = os.environ.get(f"LANGORCH_{field.upper()}")
    if url is None and _STATE.command in ("serve", "projections"):
        from langorch_infra.settings import CommonSettings

        with contextlib.suppress(ValueError):  # invalid settings (pydantic's ValidationError): the URL cannot be told
            url = str(getattr(CommonSettings(), field))
    return redact(url) if url else None


def _server(kind: str) -> str:
    """``NATS at nats://host:4222``, or just ``NATS`` when the URL cannot be told."""
    url = _configured_url(kind)
    return f"{kind} at {url}" if url else kind


def _unreachable(kind: str, exc: BaseException) -> str:
    return f"cannot connect to {_server(kind)}: {_reason(exc)}"


def _api_origin(exc: Exception) -> str:
    try:
        url = exc.request.url  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return "the configured URL"
    return f"{url.scheme}://{url.netloc.decode()}"


API_HINT = "is `langorch up` running? Point --api or LANGORCH_API_URL at the LangOrch API"


def _settings_error(exc: BaseException) -> str | None:
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError) or not exc.title.endswith("Settings"):
        return None
    fields = "; ".join(f"LANGORCH_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors())
    return f"invalid setting: {fields}"


def describe_error(exc: BaseException, *, debug: bool = False) -> tuple[int, str]:
    """``(exit code, one line)`` for an exception that reached the command line."""
    import httpx

    if isinstance(exc, CLIError):
        return exc.exit_code, exc.message
    if isinstance(exc, timeline.ApiError):
        return ExitCode.FAILED, exc.headline()
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return ExitCode.USAGE, (f"invalid API URL ({exc}); give --api or LANGORCH_API_URL as http://host:port")
    if isinstance(exc, httpx.TimeoutException):
        what = "connecting to" if isinstance(exc, httpx.ConnectTimeout) else "waiting for an answer from"
        return ExitCode.UNREACHABLE, (f"timed out {what} the LangOrch API at {_api_origin(exc)}"
                                      + (f"; {API_HINT}" if isinstance(exc, httpx.ConnectTimeout) else
                                         "; the outcome of the request is unknown"))
    if isinstance(exc, httpx.ConnectError):
        return ExitCode.UNREACHABLE, (f"cannot connect to the LangOrch API at {_api_origin(exc)} "
                                      f"({_reason(exc)}); {API_HINT}")
    if isinstance(exc, httpx.TransportError):
        return ExitCode.UNREACHABLE, (f"the connection to the LangOrch API at {_api_origin(exc)} failed "
                                      f"({_reason(exc)})")
    if isinstance(exc, httpx.HTTPError):
        return ExitCode.FAILED, f"unexpected response from the LangOrch API at {_api_origin(exc)}: {exc}"
    kind = dependency_of(exc)
    if kind is not None:
        return ExitCode.UNREACHABLE, _unreachable(kind, exc)
    if isinstance(exc, json.JSONDecodeError):
        return ExitCode.USAGE, f"not valid JSON (line {exc.lineno} column {exc.colno}): {exc.msg}"
    if isinstance(exc, OSError) and exc.filename is not None:
        return ExitCode.USAGE, f"{exc.filename}: {exc.strerror or exc}"
    settings = _settings_error(exc)
    if settings is not None:
        return ExitCode.USAGE, settings
    text = " ".join(str(exc).split())
    return ExitCode.FAILED, (f"internal error: {type(exc).__name__}" + (f": {text}" if text else "")
                             + (" — this is a bug; the traceback is above" if debug else
                                " — this is a bug; run with --debug (or LANGORCH_DEBUG=1) for the traceback"))


def report(exc: BaseException, *, debug: bool = False) -> int:
    """Print ``exc`` to stderr as ``error: <one line>`` (the traceback first with ``debug``); return the exit
    code."""
    err = Console(stderr=True, highlight=False)
    if debug:
        sys.stderr.write("".join(traceback.format_exception(exc)))
        sys.stderr.flush()
    code, line = describe_error(exc, debug=debug)
    head = Text("error: ", style="bold red")
    head.append(line)
    err.print(head, soft_wrap=True)
    if isinstance(exc, timeline.ApiError):
        _print_api_details(exc, err)
    return code


def _print_api_details(exc: timeline.ApiError, err: Console) -> None:
    """The field errors and compile diagnostics of an API problem, one per line (diagnostics with the source
    lines they are about when the request carried the file)."""
    from pydantic import ValidationError

    from ckp_core.diagnostics import Diagnostic

    for path, message in exc.field_errors():
        err.print(Text(f"  {path}: {message}"), soft_wrap=True)
    found = exc.diagnostics()
    errors = [d for d in found if d.get("severity") == "error"] or found
    source = _Source(exc.document) if exc.document is not None else None
    for raw in errors:
        try:
            diagnostic = Diagnostic.model_validate(raw)
        except ValidationError:
            err.print(Text(f"  {raw.get('path') or '/'}: {raw.get('message') or raw}"), soft_wrap=True)
            continue
        _print_diagnostic(diagnostic, source, out=err)


class _OneLineConnectionErrors(logging.Filter):
    """Log records of a failed connection to NATS or PostgreSQL (nats-py's reconnect errors, uvicorn's startup
    traceback) become one line naming the server, unless ``--debug``; an identical line is repeated at most
    every 30 s. asyncio's "exception never retrieved" of uvicorn's exit after a failed startup is dropped."""

    REPEAT_S = 30.0

    def __init__(self) -> None:
        super().__init__()
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if _STATE.debug:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, SystemExit):
            return False
        line: str | None = None
        if exc is not None:
            kind = dependency_of(exc)
            if kind is not None:
                line = f"cannot reach {_server(kind)}: {_reason(exc)}" + (
                    "; retrying" if record.name.startswith("nats") else "")
        elif isinstance(record.msg, str) and record.msg.startswith("Traceback (most recent call last)"):
            line = self._traceback_line(record.msg)
        if line is None:
            return True
        now = time.monotonic()
        if now - self.last.get(line, -math.inf) < self.REPEAT_S:
            return False
        self.last[line] = now
        record.msg, record.args, record.exc_info, record.exc_text = line, (), None, None
        return True

    @staticmethod
    def _traceback_line(text: str) -> str:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "error"
        kind = ("PostgreSQL" if f"{os.sep}asyncpg{os.sep}" in text or f"{os.sep}psycopg" in text
                else "NATS" if f"{os.sep}nats{os.sep}" in text else None)
        if kind is None:
            return f"startup failed: {last} (run with --debug for the traceback)"
        if "CancelledError" in last:
            return f"startup canceled while waiting for {_server(kind)}"
        return f"startup failed: cannot reach {_server(kind)} ({last})"


_CONNECTION_LOGGERS = ("nats.aio.client", "uvicorn.error", "asyncio")


def _logging(service: str, *, terminal_default: bool = False) -> str:
    """The process's logging (``langorch_infra.logs``), connection errors on one line; returns its format."""
    from langorch_infra import logs

    fmt = logs.setup(service, terminal_default=terminal_default)
    one_line = _OneLineConnectionErrors()
    for name in _CONNECTION_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OneLineConnectionErrors) for f in logger.filters):
            logger.addFilter(one_line)
    return fmt


@app.command()
def up(
    state_dir: Annotated[Path, typer.Option(envvar="LANGORCH_STATE_DIR", help="Data and logs of the embedded "
                                            "servers.")] = Path(".langorch"),
    host: Annotated[str, typer.Option(envvar="LANGORCH_HOST", help="Address the API listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="LANGORCH_PORT", help="Port of the API.")] = 8080,
    nats_port: Annotated[int | None, typer.Option(envvar="LANGORCH_NATS_PORT", help="Port of the embedded NATS "
                                                  "server (default: chosen on the first start, then kept).")] = None,
    postgres_port: Annotated[int | None, typer.Option(envvar="LANGORCH_POSTGRES_PORT", help="Port of the embedded "
                                                      "PostgreSQL (default: chosen on the first start, then kept).")]
    = None,
    workers: Annotated[int, typer.Option(envvar="LANGORCH_WORKERS", help="Worker processes running the compiler, "
                                         "runtime and approvals beside the API's process (0: every service in one "
                                         "process).")] = 1,
    nats_sync: Annotated[str, typer.Option(envvar="LANGORCH_NATS_SYNC", help="How often the embedded NATS server "
                                           "flushes JetStream to disk: 'always' (every message, before it is "
                                           "acknowledged) or a duration such as 2m (faster; a machine crash can "
                                           "lose what was acknowledged meanwhile).")] = "always",
) -> None:
    """Start LangOrch under one command: embedded NATS and PostgreSQL (unless LANGORCH_NATS_URL /
    LANGORCH_DATABASE_URL name existing servers), the gateway, and the other services in worker processes. Ctrl-C
    stops it all (a second Ctrl-C forces the stop); the data stays in the state directory. Exit codes: 0 stopped on
    request, 1 failed while running, 2 could not start (port taken, state directory in use)."""
    from langorch.up import UpError, UpOptions
    from langorch.up import run as run_up

    out = console
    if _logging("up", terminal_default=True) == "json":  # what it tells the operator becomes log lines too
        from langorch_infra.logs import LineLogger

        out = Console(file=LineLogger(logging.getLogger("langorch.up")), width=1000, soft_wrap=True)
    options = UpOptions(state_dir=state_dir, host=host, port=port, nats_port=nats_port, postgres_port=postgres_port,
                        nats_url=os.environ.get("LANGORCH_NATS_URL") or None,
                        database_url=os.environ.get("LANGORCH_DATABASE_URL") or None, workers=workers,
                        nats_sync=nats_sync)
    try:
        code = run_up(options, out)
    except UpError as exc:
        Console(stderr=True).print(f"[red]langorch up[/]: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    # everything is stopped and closed: leave without tearing down ~1,900 modules one by one (about a second)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help="compiler, runtime, approvals, triggers or gateway")],
    host: Annotated[str, typer.Option(envvar="LANGORCH_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="LANGORCH_PORT")] = 8080,
) -> None:
    """Run one service against LANGORCH_NATS_URL and LANGORCH_DATABASE_URL (what Kubernetes runs)."""
    from langorch_infra import loops
    from langorch_infra.settings import CommonSettings

    if service not in SERVICES:
        console.print(f"[red]unknown service {service!r}; expected one of {', '.join(SERVICES)}[/]")
        raise typer.Exit(2)
    _logging(service)
    common = CommonSettings()
    if service == "gateway":  # settings the gateway would refuse at start-up: a usage error, said now
        from langorch_gateway.users import StartupRefused, check_startup
        from langorch_infra.settings import GatewaySettings

        try:
            check_startup(GatewaySettings(host=host, port=port))
        except StartupRefused as exc:
            raise CLIError(str(exc), ExitCode.USAGE) from exc
    loops.run(serve_until_stopped((service,), common.nats_url, common.database_url, host, port))


SEVERITY_COLORS = {"error": "red", "warning": "yellow", "info": "blue"}


def _parse_vars(items: list[str] | None, option: str = "--var") -> dict[str, Any]:
    """``--var k=v`` options (``option``: their name in errors); values are parsed as JSON when they are JSON, else
    kept as strings."""
    inputs: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CLIError(f"{option} {item!r}: expected key=value", ExitCode.USAGE)
        try:
            inputs[key] = json.loads(raw)
        except ValueError:
            inputs[key] = raw
    return inputs


def read_input(path: Path) -> bytes:
    """The bytes of a CKP input file (see :func:`langorch.errors.read_file`)."""
    return read_file(path, "a CKP JSON file")


def load_json(path: Path) -> tuple[bytes, Any]:
    """The bytes and the decoded JSON of an input file; an empty file or one that is not JSON is a usage error
    naming it (with the line:column of the JSON error)."""
    data = read_input(path)
    if not data.strip():
        raise CLIError(f"{path}: the file is empty; expected a CKP JSON document", ExitCode.USAGE)
    try:
        return data, json.loads(data)
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}", ExitCode.USAGE) from exc
    except UnicodeDecodeError as exc:
        raise CLIError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})", ExitCode.USAGE) from exc
    except RecursionError as exc:
        raise CLIError(f"{path}: the JSON is nested too deeply", ExitCode.USAGE) from exc


def _decode_error_line(data: bytes) -> int | None:
    try:
        json.loads(data)
    except json.JSONDecodeError as exc:
        return exc.lineno
    except (ValueError, RecursionError):
        return None
    return None


class _Source:
    """One CKP file's text, for locating diagnostics' JSON Pointers in it."""

    def __init__(self, data: bytes) -> None:
        from langorch.excerpt import pointer_offsets

        self.data = data
        self.text = data.decode("utf-8", errors="replace")
        self.offsets = pointer_offsets(self.text)
        self.decode_error_line = _decode_error_line(data)

    def locate(self, pointer: str) -> tuple[int | None, str | None, bool]:
        """``(line, pointer found, exact)``; for a document that is not JSON, the parser's error line."""
        from langorch.excerpt import locate

        if self.decode_error_line is not None:
            return self.decode_error_line, None, False
        found = locate(self.text, pointer, self.offsets)
        return (found.line, found.pointer, found.exact) if found is not None else (None, None, False)


def _print_diagnostic(d: Any, source: _Source | None, context: int = 2, out: Console | None = None) -> None:
    from rich.text import Text

    from langorch.excerpt import excerpt

    out = out or console
    color = SEVERITY_COLORS[d.severity]
    head = Text("  ")
    head.append(d.severity, style=color)
    message = d.message.removeprefix(f"{d.path}: ") if d.path else d.message
    head.append(f" {d.code} at {d.path or '/'}: {message}")
    out.print(head)
    if d.hint:
        out.print(Text(f"      hint: {d.hint}", style="dim"))
    if source is None:
        return
    line, found, exact = source.locate(d.path)
    if line is None:
        return
    if found is not None and not exact:
        out.print(Text(f"      (not in the file; nearest: {found or '/'})", style="dim"))
    for n, text in excerpt(source.text, line, context):
        marker = ">" if n == line else " "
        row = Text(f"    {marker}{n:>5} | ", style="bold " + color if n == line else "dim")
        row.append(text)
        out.print(row, soft_wrap=True)


@app.command()
def validate(
    files: Annotated[list[Path], typer.Argument(help="CKP JSON files.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report instead.")] = False,
    context: Annotated[int, typer.Option(help="Lines of source shown around each diagnostic.")] = 2,
) -> None:
    """Compile CKP files and print every diagnostic with the source lines it is about; exit 1 when any file has
    errors (a file that is empty or not JSON is rejected with its diagnostic), 2 when a file cannot be read."""
    from ckp_core.compiler import compile_text

    failed = False
    report: dict[str, Any] = {}
    inputs = [(f, read_input(f)) for f in files]  # every file readable before any output
    for f, data in inputs:
        result = compile_text(data)
        source = _Source(data)
        failed |= not result.ok
        if as_json:
            diagnostics = []
            for d in result.diagnostics:
                line, found, exact = source.locate(d.path)
                diagnostics.append({**d.model_dump(mode="json"), "line": line, "located_at": found,
                                    "exact": exact})
            report[str(f)] = {"valid": result.ok, "procedure_id": result.procedure_id, "version": result.version,
                              "summary": result.summary(), "diagnostics": diagnostics}
            continue
        counts = result.summary()
        status = "[green]ok[/]" if result.ok else "[red]rejected[/]"
        console.print(f"[bold]{f}[/]: {status} ({counts['errors']} errors, {counts['warnings']} warnings, "
                      f"{counts['infos']} infos)", highlight=False)
        for d in result.diagnostics:
            _print_diagnostic(d, source, context)
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    raise typer.Exit(1 if failed else 0)


def _compile_or_exit(file: Path) -> Any:
    """The IR of FILE; on compile errors print them (with excerpts) to stderr and exit 1 (a file that cannot be
    read, is empty or is not JSON: one line, exit 2)."""
    from ckp_core.compiler import compile_text

    data, _ = load_json(file)
    result = compile_text(data)
    if result.ir is None:
        err = Console(stderr=True)
        err.print(f"[bold]{file}[/]: [red]rejected[/]", highlight=False)
        source = _Source(data)
        for d in result.errors:
            _print_diagnostic(d, source, out=err)
        raise typer.Exit(1)
    return result.ir


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _print_explain(out: dict[str, Any]) -> None:
    from rich.table import Table

    def table(title: str, *columns: str) -> Table:
        t = Table(title=title, title_justify="left", show_lines=False)
        for c in columns:
            t.add_column(c, overflow="fold")
        return t

    console.print(f"[bold]{out['procedure_id']}[/] {out['version']}"
                  + (f" — {out['description']}" if out.get("description") else ""), highlight=False)
    nodes = table("Nodes", "id", "type", "agent", "actions", "description")
    for n in out["nodes"]:
        nodes.add_row(n["id"], n["type"], _cell(n["agent"]), ", ".join(n["actions"]), _cell(n["description"]))
    console.print(nodes)
    edges = table("Edges", "from", "to", "condition")
    for e in out["edges"]:
        edges.add_row(e["from"], e["to"], e["condition"])
    console.print(edges)
    v = out["variables"]
    variables = table("Variables", "name", "type", "required", "default", "status")
    for name, spec in v["schema"].items():
        status = "missing" if name in v["missing_inputs"] else "provided" if name in v["provided"] else ""
        if name in v["produced"]:
            status = (status + ", " if status else "") + "produced"
        variables.add_row(name, _cell(spec.get("type")), "yes" if spec.get("required") else "no",
                          _cell(spec.get("default")), status)
    for name in v["produced"]:
        if name not in v["schema"]:
            variables.add_row(name, "-", "no", "-", "produced (undeclared)")
    console.print(variables)
    for field, messages in out.get("input_errors", {}).items():
        console.print(f"[red]{field}[/]: {'; '.join(messages)}", highlight=False)
    trace = table("Route trace", "#", "node", "type", "reason")
    for i, entry in enumerate(out["route_trace"], 1):
        trace.add_row(str(i), entry["node_id"], entry["type"], entry["reason"])
    console.print(trace)
    calls = table(f"External calls ({len(out['external_calls'])})", "node", "step", "binding", "channel", "action")
    for c in out["external_calls"]:
        calls.add_row(c["node_id"], c["step_id"], c["binding"], _cell(c["channel"]), c["action"])
    console.print(calls)
    policy = out["policy_summary"]
    timeouts = policy["timeouts"]
    console.print(f"[bold]Policies[/]: run timeout {_cell(timeouts['run_timeout_ms'])} ms, default step timeout "
                  f"{_cell(timeouts['default_step_timeout_ms'])} ms, checkpoints "
                  f"{policy['checkpoints']['strategy']} ({', '.join(policy['checkpoints']['nodes']) or 'none'})",
                  highlight=False)
    if policy["retries"]:
        retries = table("Retries", "node", "step", "source", "max_retries", "strategy", "delay ms")
        for r in policy["retries"]:
            retries.add_row(r["node_id"], _cell(r["step_id"]), r["source"], str(r["max_retries"]),
                            _cell(r.get("strategy")), _cell(r.get("retry_delay_ms")))
        console.print(retries)
    if policy["sla"]:
        sla = table("SLA", "node", "max_duration_ms", "on_breach", "escalation")
        for s in policy["sla"]:
            sla.add_row(s["node_id"], str(s["max_duration_ms"]), s["on_breach"], _cell(s["escalation_handler"]))
        console.print(sla)
    if out["hints"]:
        hints = table("Hints", "node", "step", "message")
        for h in out["hints"]:
            hints.add_row(h["node_id"], h["step_id"], h["message"])
        console.print(hints)
    if out["diagnostics"]:
        diags = table("Diagnostics", "severity", "code", "path", "message")
        for d in out["diagnostics"]:
            diags.add_row(d["severity"], d["code"], d["path"] or "/", d["message"])
        console.print(diags)


@app.command()
def explain(
    file: Annotated[Path, typer.Argument(help="A CKP JSON file.", show_default=False)],
    var: Annotated[list[str] | None, typer.Option("--var", help="Input variable k=v (JSON values parsed).")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the ExplainOut JSON instead.")] = False,
) -> None:
    """Static analysis of a CKP file: nodes, edges, variables, the route the inputs take, external calls,
    policies. Nothing runs. Exit 1 when the file is rejected or --var values fail the input validation (the
    report is printed all the same)."""
    from ckp_core.analysis import explain as explain_ir

    inputs = _parse_vars(var)
    out = explain_ir(_compile_or_exit(file), inputs)
    if as_json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        _print_explain(out)
    errors: dict[str, list[str]] = out.get("input_errors") or {}
    if errors:
        listed = "; ".join(f"{field}: {', '.join(messages)}" for field, messages in errors.items())
        raise CLIError(f"--var values fail the input validation of {file}: {listed}")


class GraphFormat(StrEnum):
    mermaid = "mermaid"
    dot = "dot"
    json = "json"


@app.command()
def graph(
    file: Annotated[Path, typer.Argument(help="A CKP JSON file.", show_default=False)],
    fmt: Annotated[GraphFormat, typer.Option("--format", "-f", help="mermaid, dot (Graphviz) or json (GraphOut).")]
    = GraphFormat.mermaid,
) -> None:
    """Print the procedure graph of a CKP file as Mermaid, DOT or the API's GraphOut JSON."""
    from ckp_core import analysis

    ir = _compile_or_exit(file)
    if fmt is GraphFormat.json:
        sys.stdout.write(json.dumps(analysis.graph_view(ir), indent=2, ensure_ascii=False) + "\n")
    elif fmt is GraphFormat.dot:
        sys.stdout.write(analysis.dot(ir))
    else:
        sys.stdout.write(analysis.mermaid(ir))


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="A CKP JSON file.", show_default=False)],
    var: Annotated[list[str] | None, typer.Option("--var", help="Input variable k=v (JSON values parsed).")]
    = None,
    follow: Annotated[bool, typer.Option("--follow/--no-follow")] = False,
    api: Annotated[str, typer.Option(envvar="LANGORCH_API_URL", help=API_HELP)] = DEFAULT_API,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="LANGORCH_API_KEY", help=API_KEY_HELP,
                                                show_default=False)] = None,
    retry_for: Annotated[float, typer.Option("--retry-for", min=0, help="Seconds to keep trying the import and "
                                             "the start while the API refuses them for now (429 overloaded, 503 "
                                             "unavailable), waiting as its Retry-After says; 0: never.")]
    = timeline.RETRY_FOR_S,
) -> None:
    """Import FILE (unless that exact version is already imported), start a run and print its timeline. Exit 1
    when the API refuses the import or the run (a refused credential included: the message says which and what
    to do), or the followed run ends other than completed; 3 when the API cannot be reached. A 429 or 503 with
    Retry-After is tried again, with the same Idempotency-Key, for up to --retry-for seconds."""
    from langorch.access import resolve

    inputs = _parse_vars(var)
    data, ckp = load_json(file)
    credential = resolve(api, api_key)
    code = asyncio.run(timeline.import_and_run(api, ckp, inputs, follow, console, document=data,
                                               credential=credential, retry_for_s=retry_for))
    raise typer.Exit(code)


@projections_app.command("rebuild")
def projections_rebuild() -> None:
    """Drop the projection tables and replay LO_EVT into them (stop gateways first). Exit 3 when NATS
    (LANGORCH_NATS_URL) or PostgreSQL (LANGORCH_DATABASE_URL) cannot be reached."""
    from langorch_gateway.projector import rebuild
    from langorch_infra.settings import CommonSettings

    settings = CommonSettings()

    async def main() -> int:
        nc = await connect_nats(settings.nats_url, "langorch-rebuild", settings=settings)
        try:
            pool = await connect_postgres(settings.database_url)
            try:
                return await rebuild(pool, nc.jetstream(), audit_retention_days=settings.audit_retention_days)
            finally:
                await pool.close()
        finally:
            await nc.close()

    position = asyncio.run(main())
    console.print(f"projections rebuilt up to LO_EVT position {position}")


async def connect_nats(url: str, name: str, attempts: int = 10, *, settings: Any = None) -> Any:
    """A NATS connection for a one-shot command: a few attempts half a second apart (not the services' endless
    wait), then a :class:`CLIError` naming the URL (exit 3); connection errors never log tracebacks. ``settings``
    (a ``CommonSettings``) gives the NATS credential and TLS settings; a file they name that is missing is exit 2."""
    import nats

    from langorch_infra.nats_auth import NatsCredentialError, connect_options, nats_servers

    try:
        options = connect_options(settings)
    except NatsCredentialError as exc:
        raise CLIError(str(exc), ExitCode.USAGE) from exc

    log = logging.getLogger("langorch.cli")
    failures: list[BaseException] = []
    connected = False

    async def on_error(exc: Exception) -> None:
        if connected:
            log.warning("NATS at %s: %s", redact(url), _reason(exc))
        else:
            failures.append(exc)

    try:
        nc = await nats.connect(nats_servers(url), name=name, connect_timeout=5, max_reconnect_attempts=attempts,
                                reconnect_time_wait=0.5, error_cb=on_error, **options)
    except Exception as exc:  # whatever the client raises, NATS is unreachable; the cause is reported
        cause = failures[-1] if failures else exc
        raise CLIError(f"cannot connect to NATS at {redact(url)}: {_reason(cause)}",
                       ExitCode.UNREACHABLE) from exc
    connected = True
    return nc


async def connect_postgres(url: str) -> Any:
    """An asyncpg pool of two connections; a server that cannot be reached (or refuses the login, or has no such
    database) is a :class:`CLIError` naming the URL without its password (exit 3)."""
    import asyncpg

    try:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2, timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise CLIError(f"cannot connect to PostgreSQL at {redact(url)}: {_reason(exc)}",
                       ExitCode.UNREACHABLE) from exc
    assert pool is not None
    return pool


accounts.register(app)
cli_webhook.register(app)
cli_triggers.register(app)
cli_cluster.register(app)

for _info in (*app.registered_commands, *projections_app.registered_commands):
    if not _info.epilog:
        _info.epilog = EXIT_CODES_HELP


def main() -> None:  # pragma: no cover
    sys.exit(app())
