"""The exit codes and the user-facing error of every ``langorch`` command (``langorch.cli``'s docstring says when
each code applies)."""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """The process exit codes of every ``langorch`` command (the module docstring says when each applies)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    UNREACHABLE = 3
    INTERRUPTED = 130


EXIT_CODES_HELP = ("Exit codes: 0 success; 1 failed (procedure rejected, run not completed, invalid --var values, "
                   "the API answered with an error); 2 usage error (bad option, missing/unreadable/empty/non-JSON "
                   "file, bad --var syntax); 3 server unreachable or timed out (API, NATS, PostgreSQL); "
                   "130 interrupted. --debug (LANGORCH_DEBUG=1) shows tracebacks.")


class CLIError(Exception):
    """A user-facing failure: ``message`` (one line) goes to stderr after ``error:``, then exit ``exit_code``."""

    def __init__(self, message: str, exit_code: int = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = int(exit_code)


def read_file(path: Path, expected: str) -> bytes:
    """The bytes of an input file; a path that is missing, a directory or unreadable is a usage error naming it
    (``expected`` says what the file should have been, e.g. ``a CKP JSON file``)."""
    if path.is_dir():
        raise CLIError(f"{path}: is a directory; expected {expected}", ExitCode.USAGE)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror or exc}", ExitCode.USAGE) from exc


DEFAULT_API = "http://127.0.0.1:8080"
API_HELP = "Base URL of the LangOrch API."
API_KEY_HELP = ("API key sent to the API (lo_<key_id>_<secret>); default: the login saved by `langorch login`, "
                "else the admin key of a local `langorch up` (.langorch/api-key).")
