"""``langorch webhook sign``: print the signature headers a webhook sender adds for a body and a secret (api.md
§10.5), and optionally a ready ``curl`` command, so senders can check their own signing against LangOrch's.

Nothing is sent and no server is needed: the command computes the same HMAC-SHA256 the gateway verifies
(:mod:`ckp_core.webhook_signing`). The secret is read from an environment variable or a file, never from the
command line, so it stays out of shell history and process lists."""

from __future__ import annotations

import os
import shlex
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from ckp_core.webhook_signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature_headers
from langorch.errors import EXIT_CODES_HELP, CLIError, ExitCode, read_file

webhook_app = typer.Typer(help="Webhook helpers for senders: compute the signature headers of a body.",
                          no_args_is_help=True, epilog=EXIT_CODES_HELP)


class Scheme(StrEnum):
    timestamped = "timestamped"
    body = "body"


def _secret_from_env(name: str) -> bytes:
    value = os.environ.get(name)
    if value is None:
        raise CLIError(f"--secret-env {name}: the environment variable is not set", ExitCode.USAGE)
    if not value:
        raise CLIError(f"--secret-env {name}: the environment variable is empty", ExitCode.USAGE)
    return value.encode("utf-8")


def _secret_from_file(path: Path) -> bytes:
    if path.is_dir():
        raise CLIError(f"--secret-file {path}: is a directory; expected a file holding the secret", ExitCode.USAGE)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CLIError(f"--secret-file {path}: cannot read it: {exc.strerror or exc}", ExitCode.USAGE) from exc
    # one trailing line break is how editors and `echo` end a file; it is not part of the secret
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise CLIError(f"--secret-file {path}: the file is empty", ExitCode.USAGE)
    return data


def _read_body(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    return read_file(Path(source), "the body file to sign (or - for stdin)")


def curl_command(url: str, headers: dict[str, str], body_source: str, content_type: str) -> str:
    """A shell-quoted ``curl`` line that POSTs the exact body bytes with the signature headers."""
    parts = ["curl", "-sS", "-X", "POST", url, "-H", f"Content-Type: {content_type}"]
    for name, value in headers.items():
        parts += ["-H", f"{name}: {value}"]
    parts += ["--data-binary", f"@{body_source}"]
    return " ".join(shlex.quote(p) for p in parts)


@webhook_app.command("sign", epilog=EXIT_CODES_HELP)
def sign_command(
    body: Annotated[str, typer.Argument(metavar="BODY_FILE|-", show_default=False,
                                        help="The exact body to sign: a file, or - to read standard input.")],
    secret_env: Annotated[list[str] | None, typer.Option(
        "--secret-env", metavar="VAR", show_default=False,
        help="Name of an environment variable holding the secret. Repeat it (or mix with --secret-file) to "
             "sign with several secrets, as a sender does while rotating.")] = None,
    secret_file: Annotated[list[Path] | None, typer.Option(
        "--secret-file", metavar="FILE", show_default=False,
        help="A file holding the secret (one trailing line break is ignored). Repeatable.")] = None,
    scheme: Annotated[Scheme, typer.Option(
        "--scheme", help="timestamped: HMAC over '<timestamp>.' + body; body: HMAC over the body only.")]
    = Scheme.timestamped,
    timestamp: Annotated[int | None, typer.Option(
        "--timestamp", min=0, show_default=False,
        help="Unix seconds to sign with (timestamped scheme; default: now). The gateway accepts 300 s of skew "
             "by default.")] = None,
    url: Annotated[str | None, typer.Option(
        "--url", show_default=False,
        help="Also print a curl command that POSTs the body to this webhook URL "
             "(…/api/triggers/webhook/<procedure_id>).")] = None,
    content_type: Annotated[str, typer.Option(
        "--content-type", help="Content-Type of the curl command.")] = "application/json",
) -> None:
    """Print the X-LangOrch-Timestamp and X-LangOrch-Signature headers for BODY_FILE and a secret.

    Sign the exact bytes you send: a changed byte, line ending or trailing newline gives another signature."""
    if not secret_env and not secret_file:
        raise CLIError("a secret is needed: --secret-env VAR or --secret-file FILE", ExitCode.USAGE)
    if timestamp is not None and scheme is Scheme.body:
        raise CLIError("--timestamp applies to the timestamped scheme only; the body scheme signs the body alone",
                       ExitCode.USAGE)
    if url is not None and not url.startswith(("http://", "https://")):
        raise CLIError(f"--url {url}: expected an http:// or https:// URL", ExitCode.USAGE)
    secrets = [_secret_from_env(name) for name in secret_env or []]
    secrets += [_secret_from_file(path) for path in secret_file or []]
    data = _read_body(body)
    if scheme is Scheme.timestamped and timestamp is None:
        timestamp = int(time.time())
    headers = signature_headers(secrets, data, scheme=scheme.value, timestamp=timestamp)
    for name in (TIMESTAMP_HEADER, SIGNATURE_HEADER):
        if name in headers:
            typer.echo(f"{name}: {headers[name]}")
    if url is not None:
        typer.echo(curl_command(url, headers, body, content_type))
        if scheme is Scheme.timestamped:
            typer.echo("# the timestamp is valid for a few minutes (the gateway's tolerance, 300 s by default)",
                       err=True)
        if body == "-":
            typer.echo("# pipe the same body into curl: --data-binary @- reads standard input", err=True)


def register(app: typer.Typer) -> None:
    """Add ``langorch webhook …`` to ``langorch``."""
    app.add_typer(webhook_app, name="webhook")
