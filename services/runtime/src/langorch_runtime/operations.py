"""Internal operations (ckp.md §4.3): the pure execution library the interpreter calls.

:func:`run_operation` executes one operation with its parameters **already rendered** (§5.1) and returns an
:class:`OpOutcome`: the result (for ``output_variable``), variable writes, events to emit, names and values to
treat as sensitive (§7.15), artifacts to record and whether to checkpoint now. It never touches run state
itself: the runtime applies ``writes`` with :func:`apply_writes`, emits ``events`` and stores the result.

Failures raise :class:`~langorch_runtime.errors.StepError` whose error object has ``code`` ``operation_failed``
(with ``details.reason``) or the operation's own code (``expression_error``, ``schema_validation_failed``,
``decryption_failed``, ``conversion_failed``, ``secret_not_found``), and ``details.action`` (plus
``details.index`` for the operations of ``processing`` nodes and ``terminate`` action lists).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import hashlib
import hmac
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jsonschema
import re2
import referencing.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ckp_core.events import ErrorObject, EventData, Log, NotificationRequested, ScreenshotRequested
from ckp_core.expressions import (
    MAX_PATTERN_BYTES,
    ExpressionError,
    MappingScope,
    Scope,
    evaluate,
    format_embedded,
    json_type_name,
)
from ckp_core.ids import new_id
from ckp_core.ir import OperationIR, StepIR
from langorch_runtime.errors import StepError, expression_failure, failure
from langorch_runtime.parsers import (
    ParseError,
    canonical_json,
    compact_json,
    loads_json,
    parse_csv,
    parse_json_text,
    parse_workbook,
    parse_xml,
)

__all__ = [
    "INTERNAL_OPERATIONS",
    "LOG_LEVELS",
    "ArtifactLoader",
    "ArtifactRequest",
    "Notifier",
    "OpContext",
    "OpOutcome",
    "SecretRef",
    "SecretResolver",
    "StepError",
    "apply_writes",
    "check_write_path",
    "derive_key",
    "run_operation",
]

log = logging.getLogger(__name__)

LOG_LEVELS: dict[str, int] = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}
MAX_LOG_MESSAGE_BYTES = 8 * 1024
MAX_SCHEMA_ERRORS = 100
NOTIFY_TIMEOUT_S = 10.0
ENCRYPTION_INFO = b"langorch-encrypt"
_ENVELOPE_VERSION = "v1"
_MS = timedelta(milliseconds=1)
_S = timedelta(seconds=1)

SecretResolver: TypeAlias = Callable[[str, str | None], Awaitable[str]]
"""``(alias, field) -> value``; raises :class:`StepError` ``secret_not_found`` / ``secret_unavailable``."""
ArtifactLoader: TypeAlias = Callable[[Mapping[str, Any]], Awaitable[bytes]]
"""Reads a stored artifact named by ``{artifact_id}`` or ``{uri}`` (``parse_excel_data`` sources)."""
Notifier: TypeAlias = Callable[[dict[str, Any]], Awaitable[None]]
"""POSTs a ``notification_requested`` payload to the server's notification webhook (best effort)."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class SecretRef:
    """A secret the operation resolves itself: the runtime may render ``{{secrets.a.f}}`` in a ``key`` parameter
    to this marker instead of the value; :func:`run_operation` then calls ``OpContext.secret_resolver``."""

    alias: str
    field: str | None = None


@dataclass(frozen=True)
class ArtifactRequest:
    """An artifact the runtime records (§4.12) and announces with ``artifact_created``."""

    kind: str
    uri: str
    name: str | None = None
    mime_type: str | None = None


@dataclass
class OpContext:
    """What an operation may use beyond its parameters.

    * ``node_id``/``step_id``/``frame``/``attempt``: position fields copied into emitted events.
    * ``logging_level``: ``log`` emits only at or above it.
    * ``scope``: the read scope of ``calculate`` (variables, then built-ins); default: the variables only.
    * ``on_unresolved``: ``(root, reason)`` for unresolved paths in ``calculate`` (template warnings).
    * ``sleep``: cancellable sleep in seconds (``wait``); ``clock``: aware UTC now (``get_timestamp``).
    * ``secret_resolver``: resolves :class:`SecretRef` markers in ``key`` parameters.
    * ``load_artifact``: reads stored artifacts for ``parse_excel_data``; ``None`` refuses such sources.
    * ``notifier``: the notification webhook for ``notify``; pass ``None`` in ``dry_run`` and under mocks.
    """

    node_id: str | None = None
    step_id: str | None = None
    frame: str | None = None
    attempt: int | None = None
    logging_level: str = "INFO"
    scope: Scope | None = None
    on_unresolved: Callable[[str, str], None] | None = None
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    clock: Callable[[], datetime] = _utc_now
    secret_resolver: SecretResolver | None = None
    load_artifact: ArtifactLoader | None = None
    notifier: Notifier | None = None


@dataclass
class OpOutcome:
    """The effect of one operation; the runtime applies it.

    * ``result``: the operation's result; the runtime writes it to ``output_variable`` when there is one
      (it is **not** repeated in ``writes``).
    * ``writes``: variable writes, name or dotted path (``set_variable``) → value; apply with
      :func:`apply_writes`.
    * ``events``: run event payloads to emit, in order (``log``, ``notification_requested``,
      ``screenshot_requested``).
    * ``sensitive_outputs``: variable names whose values are sensitive from now on (``decrypt``'s
      ``output_variable``, §7.15 rule 2).
    * ``sensitive_values``: string values to mask in this run's events (secret values resolved here, decrypted
      plaintexts; §7.15 rule 3).
    * ``artifacts``: artifacts to record (``screenshot`` with a ``uri``). The runtime must not harvest the
      same result again (§4.12).
    * ``checkpoint``: ``set_checkpoint`` — persist run state now and emit ``checkpoint_saved
      {reason: "set_checkpoint"}`` (no-op when ``checkpoint_strategy`` is ``disabled``).
    """

    result: Any = None
    writes: dict[str, Any] = field(default_factory=dict)
    events: list[EventData] = field(default_factory=list)
    sensitive_outputs: set[str] = field(default_factory=set)
    sensitive_values: set[str] = field(default_factory=set)
    artifacts: list[ArtifactRequest] = field(default_factory=list)
    checkpoint: bool = False


# -- writes --------------------------------------------------------------------------------------------------


def check_write_path(vars_: Mapping[str, Any], path: str) -> None:
    """Raise ``operation_failed`` (``not_an_object``) when writing ``path`` would cross a non-object."""
    parts = path.split(".")
    cur: Any = vars_
    for depth, part in enumerate(parts[:-1]):
        if not isinstance(cur, Mapping) or part not in cur:
            return
        cur = cur[part]
        if not isinstance(cur, Mapping):
            crossed = ".".join(parts[: depth + 1])
            raise failure("not_an_object", f"cannot write '{path}': '{crossed}' is {json_type_name(cur)}, "
                          "not an object", variable=path)


def apply_writes(vars_: dict[str, Any], writes: Mapping[str, Any]) -> None:
    """Apply variable writes in order. A dotted path replaces one key, creating missing intermediate objects.

    Objects along a dotted path are copied before the change (copy-on-write), so values shared with step
    records, results or other variables are never mutated. Raises ``operation_failed`` (``not_an_object``)
    when a path crosses a non-object; nothing of that write is applied then.
    """
    for path, value in writes.items():
        parts = path.split(".")
        if len(parts) == 1:
            vars_[path] = value
            continue
        check_write_path(vars_, path)
        container: dict[str, Any] = vars_
        for part in parts[:-1]:
            existing = container.get(part)
            child = dict(existing) if isinstance(existing, Mapping) else {}
            container[part] = child
            container = child
        container[parts[-1]] = value


# -- parameter helpers ---------------------------------------------------------------------------------------


def _invalid(name: str, value: Any, expected: str) -> StepError:
    return failure("invalid_value", f"'{name}' must be {expected}, got {json_type_name(value)}", field=name)


def _int_param(params: Mapping[str, Any], name: str, default: int | None = None, minimum: int = 0) -> int:
    value = params.get(name)
    if value is None:
        if default is None:
            raise failure("invalid_value", f"'{name}' is required", field=name)
        return default
    number: Any = value
    if isinstance(value, str):
        try:
            number = float(value.strip()) if "." in value or "e" in value.lower() else int(value.strip())
        except ValueError:
            raise _invalid(name, value, "an integer") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise _invalid(name, value, "an integer")
    if isinstance(number, float) and not number.is_integer():
        raise _invalid(name, value, "an integer")
    if int(number) < minimum:
        raise failure("invalid_value", f"'{name}' must be at least {minimum}", field=name)
    return int(number)


def _bool_param(params: Mapping[str, Any], name: str, default: bool) -> bool:
    value = params.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _invalid(name, value, "a boolean")


def _str_param(params: Mapping[str, Any], name: str, default: str | None = None) -> str | None:
    value = params.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _invalid(name, value, "a string")
    return value


def _choice(params: Mapping[str, Any], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = _str_param(params, name, default)
    assert value is not None
    if value not in allowed:
        raise failure("invalid_value", f"'{name}' must be one of {', '.join(allowed)}, got '{value}'", field=name)
    return value


def _text(value: Any) -> str:
    """Strings as is; anything else as embedded text (§5.1)."""
    return value if isinstance(value, str) else format_embedded(value)


# -- the operations ------------------------------------------------------------------------------------------


@dataclass
class _Call:
    action: str
    params: Mapping[str, Any]
    names: Mapping[str, str]
    vars: Mapping[str, Any]
    ctx: OpContext
    op: OperationIR
    out: OpOutcome

    def position(self) -> dict[str, Any]:
        return {"node_id": self.ctx.node_id, "step_id": self.ctx.step_id, "frame": self.ctx.frame,
                "attempt": self.ctx.attempt}


_Handler: TypeAlias = Callable[[_Call], Awaitable[Any]]


async def _log(c: _Call) -> Any:
    level = _str_param(c.params, "level", "INFO")
    assert level is not None
    level = level.upper()
    if level not in LOG_LEVELS:
        raise failure("invalid_value", f"'level' must be one of DEBUG, INFO, WARNING, ERROR, got '{level}'",
                      field="level")
    threshold = LOG_LEVELS.get(c.ctx.logging_level.upper(), LOG_LEVELS["INFO"])
    if LOG_LEVELS[level] >= threshold:
        message = _text(c.params.get("message"))
        raw = message.encode("utf-8")
        if len(raw) > MAX_LOG_MESSAGE_BYTES:
            message = raw[:MAX_LOG_MESSAGE_BYTES].decode("utf-8", "ignore")
        pos = c.position()
        c.out.events.append(Log(node_id=pos["node_id"], step_id=pos["step_id"], level=level, message=message,
                                frame=pos["frame"], attempt=pos["attempt"]))
    return None


async def _wait(c: _Call) -> Any:
    ms = _int_param(c.params, "duration_ms")
    await c.ctx.sleep(ms / 1000)
    return {"waited_ms": ms}


async def _set_variable(c: _Call) -> Any:
    path = c.names.get("variable")
    if not path:
        raise failure("invalid_value", "'variable' is required", field="variable")
    value = c.params.get("value")
    check_write_path(c.vars, path)
    c.out.writes[path] = value
    return copy.deepcopy(value)


async def _append_to_array(c: _Call) -> Any:
    name = c.names.get("array")
    if not name:
        raise failure("invalid_value", "'array' is required", field="array")
    current = c.vars.get(name)
    if current is None:
        current = []
    if not isinstance(current, list):
        raise failure("not_a_list", f"variable '{name}' is {json_type_name(current)}, not a list", variable=name)
    new = [*current, c.params.get("value")]
    c.out.writes[name] = new
    return list(new)


async def _parse_json(c: _Call) -> Any:
    source = c.params.get("source")
    if isinstance(source, (dict, list)):
        return source
    if not isinstance(source, str):
        raise failure("invalid_json", f"'source' must be JSON text, got {json_type_name(source)}")
    try:
        return parse_json_text(source)
    except ParseError as exc:
        raise failure(exc.reason, exc.message) from None


async def _parse_xml(c: _Call) -> Any:
    source = c.params.get("source")
    if not isinstance(source, str):
        raise failure("invalid_xml", f"'source' must be XML text, got {json_type_name(source)}")
    try:
        return parse_xml(source)
    except ParseError as exc:
        raise failure(exc.reason, exc.message) from None


async def _parse_csv(c: _Call) -> Any:
    source = c.params.get("source")
    if not isinstance(source, str):
        raise failure("invalid_csv", f"'source' must be CSV text, got {json_type_name(source)}")
    delimiter = _str_param(c.params, "delimiter", ",")
    quotechar = _str_param(c.params, "quotechar", '"')
    for name, value in (("delimiter", delimiter), ("quotechar", quotechar)):
        if value is None or len(value) != 1:
            raise failure("invalid_value", f"'{name}' must be a single character", field=name)
    assert delimiter is not None
    assert quotechar is not None
    try:
        return parse_csv(source, delimiter, quotechar, _bool_param(c.params, "header", True),
                         _bool_param(c.params, "infer_types", False))
    except ParseError as exc:
        raise failure(exc.reason, exc.message, **exc.details) from None


def _decode_base64(text: str) -> bytes | None:
    compact = "".join(text.split())
    if not compact:
        return None
    padded = (compact + "=" * (-len(compact) % 4)).encode("ascii", "replace")
    try:
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return base64.b64decode(padded, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None


async def _workbook_bytes(c: _Call, source: Any) -> bytes:
    if isinstance(source, str):
        text = source.strip()
        if text.startswith("data:"):
            header, sep, payload = text.partition(",")
            if not sep or not header.endswith(";base64"):
                raise failure("unsupported_source", "a data: URL source must be base64-encoded")
            text = payload
        data = _decode_base64(text)
        if data is None:
            raise failure("unsupported_source", "'source' must be base64 text or a data: URL of the file (local "
                          "paths are not readable)")
        return data
    if isinstance(source, Mapping):
        if isinstance(source.get("content_base64"), str):
            data = _decode_base64(source["content_base64"])
            if data is None:
                raise failure("unsupported_source", "'content_base64' is not valid base64")
            return data
        if isinstance(source.get("artifact_id"), str) or isinstance(source.get("uri"), str):
            if c.ctx.load_artifact is None:
                raise failure("unsupported_source", "stored artifacts cannot be read here")
            return await c.ctx.load_artifact(source)
    raise failure("unsupported_source", f"unsupported workbook source ({json_type_name(source)})")


async def _parse_excel_data(c: _Call) -> Any:
    source = c.params.get("source")
    sheet = c.params.get("sheet_name")
    if sheet is not None and not isinstance(sheet, str):
        raise _invalid("sheet_name", sheet, "a string")
    header = _bool_param(c.params, "header", True)
    header_row = _int_param(c.params, "header_row", 1, minimum=1)
    rows: list[Any] = []
    for item in source if isinstance(source, list) else [source]:
        data = await _workbook_bytes(c, item)
        try:
            rows.extend(parse_workbook(data, sheet, header, header_row))
        except ParseError as exc:
            raise failure(exc.reason, exc.message, **exc.details) from None
    return rows


async def _calculate(c: _Call) -> Any:
    if c.op.expression is None:
        raise failure("invalid_value", "'expression' is required", field="expression")
    scope = c.ctx.scope if c.ctx.scope is not None else MappingScope(c.vars)
    try:
        return evaluate(c.op.expression.compiled, scope, c.ctx.on_unresolved)
    except ExpressionError as exc:
        raise expression_failure(exc) from None


async def _format_string(c: _Call) -> Any:
    return _text(c.params.get("template"))


def _compile_pattern(pattern: Any, flags: str) -> Any:
    if not isinstance(pattern, str):
        raise failure("invalid_regex", f"'pattern' must be a string, got {json_type_name(pattern)}")
    if len(pattern.encode("utf-8", "replace")) > MAX_PATTERN_BYTES:
        raise failure("invalid_regex", f"pattern longer than {MAX_PATTERN_BYTES} bytes")
    options = re2.Options()
    options.log_errors = False
    options.case_sensitive = "i" not in flags
    options.dot_nl = "s" in flags
    options.never_nl = False
    options.posix_syntax = False
    text = f"(?m){pattern}" if "m" in flags else pattern
    try:
        return re2.compile(text, options)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else "invalid pattern"
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        raise failure("invalid_regex", f"invalid regex: {detail}") from None


async def _extract_regex(c: _Call) -> Any:
    flags = _str_param(c.params, "flags", "") or ""
    if not set(flags) <= set("ims"):
        raise failure("invalid_value", f"'flags' must be letters i, m, s, got '{flags}'", field="flags")
    regex = _compile_pattern(c.params.get("pattern"), flags)
    group: Any = c.params.get("group")
    if group is None:
        group = 1 if regex.groups > 0 else 0
    elif isinstance(group, str) and group.strip().isdigit():
        group = int(group.strip())
    if isinstance(group, bool) or not isinstance(group, (int, str)):
        raise _invalid("group", group, "a group number or name")
    if isinstance(group, int) and not 0 <= group <= regex.groups:
        raise failure("invalid_regex", f"the pattern has no group {group}", group=group)
    if isinstance(group, str) and group not in regex.groupindex:
        raise failure("invalid_regex", f"the pattern has no group named '{group}'", group=group)
    source = _text(c.params.get("source"))
    if _bool_param(c.params, "all", False):
        return [m.group(group) for m in regex.finditer(source)]
    match = regex.search(source)
    return None if match is None else match.group(group)


async def _notify(c: _Call) -> Any:
    recipients = c.params.get("recipients")
    if recipients is None:
        recipient_list: list[str] = []
    elif isinstance(recipients, list):
        recipient_list = [_text(r) for r in recipients if r is not None]
    else:
        recipient_list = [_text(recipients)]
    metadata = c.params.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _invalid("metadata", metadata, "an object")
    channel, subject, message = (c.params.get(k) for k in ("channel", "subject", "message"))
    notification_id = new_id()
    event = NotificationRequested(
        **c.position(), notification_id=notification_id, recipients=recipient_list, metadata=metadata,
        channel=None if channel is None else _text(channel), subject=None if subject is None else _text(subject),
        message=None if message is None else _text(message),
    )
    c.out.events.append(event)
    if c.ctx.notifier is not None:
        payload = event.model_dump(mode="json", exclude={"node_id", "step_id", "frame", "attempt"})
        try:
            async with asyncio.timeout(NOTIFY_TIMEOUT_S):
                await c.ctx.notifier(payload)
        except Exception:  # best effort: the webhook never affects the run (cancellation still propagates)
            log.warning("notification webhook failed for %s", notification_id, exc_info=True)
    return {"notification_id": notification_id}


# -- cryptography ----------------------------------------------------------------------------------------------


def derive_key(secret: str) -> bytes:
    """The AES-256 key of a secret (§4.3): the secret decoded from base64 when that gives 32 bytes, else
    HKDF-SHA256 of its UTF-8 bytes with info ``langorch-encrypt`` (no salt)."""
    stripped = secret.strip()
    try:
        raw = base64.b64decode(stripped.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raw = b""
    if len(raw) == 32:
        return raw
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=ENCRYPTION_INFO).derive(secret.encode("utf-8"))


async def _key(c: _Call, required: bool) -> str | None:
    value = c.params.get("key")
    if isinstance(value, SecretRef):
        if c.ctx.secret_resolver is None:
            raise failure(None, f"secret '{value.alias}' cannot be resolved here", code="secret_not_found",
                          alias=value.alias)
        resolved = await c.ctx.secret_resolver(value.alias, value.field)
        c.out.sensitive_values.add(resolved)
        return resolved
    if value is None or value == "":
        if required:
            raise failure(None, "the encryption key did not resolve to a secret value", code="secret_not_found")
        return None
    if not isinstance(value, str):
        raise _invalid("key", value, "a secret value")
    return value


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode((text + "=" * (-len(text) % 4)).encode("ascii"))


def _algorithm(c: _Call) -> None:
    _choice(c.params, "algorithm", "aes-256-gcm", ("aes-256-gcm",))


async def _encrypt(c: _Call) -> Any:
    _algorithm(c)
    secret = await _key(c, required=True)
    assert secret is not None
    value = c.params.get("value")
    plaintext = value if isinstance(value, str) else compact_json(value)
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(derive_key(secret)).encrypt(nonce, plaintext.encode("utf-8"), None)
    return f"{_ENVELOPE_VERSION}.{_b64url(nonce)}.{_b64url(sealed)}"


async def _decrypt(c: _Call) -> Any:
    _algorithm(c)
    output_type = _choice(c.params, "output_type", "string", ("string", "json"))
    secret = await _key(c, required=True)
    assert secret is not None
    token = c.params.get("value")
    if not isinstance(token, str):
        raise failure("invalid_ciphertext", f"'value' must be an encrypted string, got {json_type_name(token)}",
                      code="decryption_failed")
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != _ENVELOPE_VERSION:
        raise failure("invalid_ciphertext", "'value' is not a v1.<nonce>.<ciphertext> string",
                      code="decryption_failed")
    try:
        nonce, sealed = _unb64url(parts[1]), _unb64url(parts[2])
        if len(nonce) != 12:
            raise ValueError("bad nonce")
        plain = AESGCM(derive_key(secret)).decrypt(nonce, sealed, None).decode("utf-8")
    except (InvalidTag, ValueError, binascii.Error, UnicodeDecodeError):
        raise failure("authentication_failed", "decryption failed: wrong key or damaged ciphertext",
                      code="decryption_failed") from None
    if len(plain) >= 4:
        c.out.sensitive_values.add(plain)
    if c.op.output_variable:
        c.out.sensitive_outputs.add(c.op.output_variable)
    if output_type == "json":
        try:
            return loads_json(plain)
        except ParseError:
            raise failure("invalid_json", "the decrypted value is not JSON", code="decryption_failed") from None
    return plain


_HASHES = ("sha256", "sha512", "sha1", "md5", "blake2b")


async def _hash(c: _Call) -> Any:
    algorithm = _choice(c.params, "algorithm", "sha256", _HASHES)
    encoding = _choice(c.params, "encoding", "hex", ("hex", "base64"))
    value = c.params.get("value")
    data = (value if isinstance(value, str) else canonical_json(value)).encode("utf-8")
    key = await _key(c, required=False)
    if key is not None:
        digest = hmac.new(key.encode("utf-8"), data, algorithm).digest()
    else:
        digest = hashlib.new(algorithm, data).digest()
    return digest.hex() if encoding == "hex" else base64.b64encode(digest).decode("ascii")


# -- validation and conversion ---------------------------------------------------------------------------------


def _pointer(path: Any) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


async def _validate_schema(c: _Call) -> Any:
    schema = c.params.get("schema")
    on_invalid = _choice(c.params, "on_invalid", "fail", ("fail", "report"))
    try:
        if not isinstance(schema, (dict, bool)):
            raise jsonschema.SchemaError(f"expected an object, got {json_type_name(schema)}")
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise failure("invalid_schema", f"invalid JSON Schema: {exc.message}") from None
    validator = jsonschema.Draft202012Validator(schema)
    try:
        found = sorted(validator.iter_errors(c.params.get("value")),
                       key=lambda e: (_pointer(e.absolute_path), e.message))
    except referencing.exceptions.Unresolvable as exc:  # remote references are never fetched
        raise failure("invalid_schema", f"unresolvable schema reference: {exc}") from None
    errors = [{"path": _pointer(e.absolute_path), "message": e.message} for e in found[:MAX_SCHEMA_ERRORS]]
    if errors and on_invalid == "fail":
        raise failure(None, f"value does not match the schema ({len(found)} error{'s' if len(found) != 1 else ''})",
                      code="schema_validation_failed", errors=errors)
    return {"valid": not errors, "errors": errors}


def _conversion_failed(value: Any, target: str) -> StepError:
    return failure(None, f"cannot convert {json_type_name(value)} to {target}", code="conversion_failed",
                   target_type=target, source_type=json_type_name(value))


def _number_of(value: Any, target: str) -> int | float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number: int | float = value
    elif isinstance(value, str):
        try:
            parsed = loads_json(value.strip())
        except ParseError:
            raise _conversion_failed(value, target) from None
        if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
            raise _conversion_failed(value, target)
        number = parsed
    else:
        raise _conversion_failed(value, target)
    if (isinstance(number, float) and number != number) or number in (float("inf"), float("-inf")):
        raise _conversion_failed(value, target)
    return number


_TRUE_WORDS = frozenset({"true", "yes", "1"})
_FALSE_WORDS = frozenset({"false", "no", "0"})


def convert_value(value: Any, target: str) -> Any:
    """``convert_type`` (§4.3); raises ``conversion_failed``."""
    if value is None:
        return None
    if target == "string":
        return _text(value)
    if target == "json_string":
        try:
            return compact_json(value)
        except (TypeError, ValueError):
            raise _conversion_failed(value, target) from None
    if target == "number":
        return _number_of(value, target)
    if target == "integer":
        number = _number_of(value, target)
        if isinstance(number, float):
            if not number.is_integer():
                raise failure(None, f"{value!r} is not an integer", code="conversion_failed", target_type=target,
                              source_type=json_type_name(value))
            return int(number)
        return number
    if target == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        if isinstance(value, (int, float)) and value in (0, 1):
            return value == 1
        raise _conversion_failed(value, target)
    if target in ("array", "object"):
        kind = list if target == "array" else dict
        if isinstance(value, kind):
            return value
        if isinstance(value, str):
            try:
                parsed = loads_json(value.strip())
            except ParseError:
                raise _conversion_failed(value, target) from None
            if isinstance(parsed, kind):
                return parsed
        raise _conversion_failed(value, target)
    raise failure("invalid_value", f"unknown target_type '{target}'", field="target_type")


async def _convert_type(c: _Call) -> Any:
    target = _choice(c.params, "target_type", "string",
                     ("string", "number", "integer", "boolean", "array", "object", "json_string"))
    return convert_value(c.params.get("value"), target)


# -- ids, time, screenshots, checkpoints ---------------------------------------------------------------------


async def _generate_id(c: _Call) -> Any:
    prefix = _text(c.params.get("prefix") if c.params.get("prefix") is not None else "")
    fmt = _choice(c.params, "format", "uuid4", ("uuid4", "uuid7", "short"))
    if fmt == "uuid4":
        body = str(uuid.uuid4())
    elif fmt == "uuid7":
        body = new_id()
    else:
        body = base64.b32encode(secrets.token_bytes(8)).decode("ascii")[:12].lower()
    return prefix + body


def _zone(name: str) -> ZoneInfo:
    if not name or name.startswith("/") or ".." in name:
        raise failure("invalid_timezone", f"unknown time zone '{name}'", timezone=name)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise failure("invalid_timezone", f"unknown time zone '{name}'", timezone=name) from None


async def _get_timestamp(c: _Call) -> Any:
    fmt = _str_param(c.params, "format", "iso")
    tz_name = _str_param(c.params, "timezone", "UTC")
    assert fmt is not None
    assert tz_name is not None
    if not fmt:
        raise failure("invalid_value", "'format' must not be empty", field="format")
    now = c.ctx.clock()
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    local = now.astimezone(_zone(tz_name))
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    if fmt == "iso":
        text = local.isoformat(timespec="milliseconds")
        return text[:-6] + "Z" if text.endswith("+00:00") and tz_name.upper() in ("UTC", "Z", "ETC/UTC") else text
    if fmt == "date":
        return local.date().isoformat()
    if fmt == "epoch_ms":
        return (now - epoch) // _MS
    if fmt == "epoch_s":
        return (now - epoch) // _S
    if len(fmt) > 256:
        raise failure("invalid_value", "'format' is longer than 256 characters", field="format")
    try:
        return local.strftime(fmt)
    except (ValueError, UnicodeError) as exc:
        raise failure("invalid_value", f"invalid strftime pattern: {exc}", field="format") from None


async def _screenshot(c: _Call) -> Any:
    uri = c.params.get("uri")
    name = c.params.get("name")
    if uri is None or uri == "":
        c.out.events.append(ScreenshotRequested(**c.position(), reason="orchestrator_step"))
        return None
    if not isinstance(uri, str):
        raise _invalid("uri", uri, "a string")
    c.out.artifacts.append(ArtifactRequest(kind="screenshot", uri=uri, name=None if name is None else _text(name)))
    return {"screenshot": uri}


async def _set_checkpoint(c: _Call) -> Any:
    c.out.checkpoint = True
    return None


_OPERATIONS: dict[str, _Handler] = {
    "log": _log,
    "wait": _wait,
    "set_variable": _set_variable,
    "append_to_array": _append_to_array,
    "parse_json": _parse_json,
    "parse_xml": _parse_xml,
    "parse_csv": _parse_csv,
    "parse_excel_data": _parse_excel_data,
    "calculate": _calculate,
    "format_string": _format_string,
    "extract_regex": _extract_regex,
    "notify": _notify,
    "encrypt": _encrypt,
    "decrypt": _decrypt,
    "hash": _hash,
    "validate_schema": _validate_schema,
    "convert_type": _convert_type,
    "generate_id": _generate_id,
    "get_timestamp": _get_timestamp,
    "screenshot": _screenshot,
    "set_checkpoint": _set_checkpoint,
}
INTERNAL_OPERATIONS = frozenset(_OPERATIONS)


async def run_operation(op: OperationIR | StepIR, params: Mapping[str, Any], vars_: Mapping[str, Any],
                        ctx: OpContext) -> OpOutcome:
    """Execute one internal operation (§4.3) and return its outcome; raises :class:`StepError`.

    ``params`` are the operation's rendered fields (``OperationIR.params`` / ``StepIR.params`` after §5.1
    rendering); names (``variable``, ``array``) and the ``calculate`` expression come from the IR. ``vars_`` is
    read only. Errors carry ``details.action``, and ``details.index`` when ``op`` is an :class:`OperationIR`
    (processing operations and terminate actions; pass steps as :class:`StepIR`).
    """
    index: int | None = None
    if isinstance(op, StepIR):
        operation = op.as_operation()
    else:
        operation, index = op, op.index
    handler = _OPERATIONS.get(operation.action)
    extra: dict[str, Any] = {"action": operation.action}
    if index is not None:
        extra["index"] = index
    if handler is None:
        raise failure("unknown_operation", f"unknown operation '{operation.action}'", **extra)
    out = OpOutcome()
    call = _Call(action=operation.action, params=params, names=operation.names, vars=vars_, ctx=ctx, op=operation,
                 out=out)
    try:
        out.result = await handler(call)
    except StepError as exc:
        raise StepError(_with_details(exc.error, extra)) from exc
    return out


def _with_details(error: ErrorObject, extra: Mapping[str, Any]) -> ErrorObject:
    return error.model_copy(update={"details": {**error.details, **extra}})


