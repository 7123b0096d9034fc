"""Typed field access and reporting: the state of one compilation and the readers that report into it.

A reader (``obj``, ``string``, ``integer``, ``enum``, ``node_ref``, ``written``, ...) checks one field, reports
a problem as a diagnostic at the field's JSON Pointer, and returns the value or None. Also here: the identifier
patterns and the small value checks (regex, time zone) that several sections share.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import re2

from ckp_core.diagnostics import Diagnostic, Severity, pointer
from ckp_core.expressions import json_type_name
from ckp_core.ir import GlobalConfigIR, SecretReferenceIR
from ckp_core.templates import has_placeholder
from ckp_core.variables import BUILTIN_NAMES

ID_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,127}$")
VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
PROCEDURE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MISSING = object()


def strip_object(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Drop comment keys (``_…``) and null values (an optional field given as null is absent)."""
    if _plain_object(obj):  # most objects: then a copy, made without a loop in Python
        return dict(obj)
    return {k: v for k, v in obj.items() if not (isinstance(k, str) and k.startswith("_")) and v is not None}


def _plain_object(obj: Mapping[str, Any]) -> bool:
    """Whether an object has neither comment keys nor null values (what :func:`strip_object` drops)."""
    try:
        keys = "\0".join(obj)
    except TypeError:  # a key that is not a string
        return False
    return not (keys.startswith("_") or "\0_" in keys or None in obj.values())


def plain_text(canonical: bytes) -> bool:
    """Whether the canonical JSON of a document (compact, as :func:`~ckp_core.compiler.canonical_json` writes
    it) shows that none of its objects has a comment key or a null value: every key is written as ``{"`` or
    ``,"`` and its text, a string's own quotes being escaped, and a null as ``null`` (a string holding that text
    only makes the answer a cautious no)."""
    return b"null" not in canonical and b'{"_' not in canonical and b',"_' not in canonical


def templated(value: Any) -> bool:
    """Whether a value is a string with a ``{{...}}`` placeholder (its value is only known when rendered)."""
    return isinstance(value, str) and has_placeholder(value)


def regex_problem(pattern: str) -> str | None:
    """Why a regular expression is refused (too long, not RE2), or None."""
    if len(pattern.encode()) > 1024:
        return "pattern longer than 1 KiB"
    try:
        re2.compile(pattern)
    except re2.error as exc:
        return str(exc) or "does not compile"
    return None


def valid_timezone(name: str) -> bool:
    """Whether ``name`` is an IANA time zone (no paths)."""
    if not name or name.startswith("/") or ".." in name:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


class NodeContext(NamedTuple):  # (a tuple: built for every node, faster than a frozen dataclass)
    """What the payload and step compilers need to know about the node being compiled."""

    node_id: str
    type: str
    path: str
    orchestrator: bool
    channel: str | None
    dispatch_mode: str | None


# A variable an expression or placeholder reads, checked against the known names at the end: (root name, JSON
# Pointer, node id, step id). A plain tuple: there is one per placeholder and expression root.
Read = tuple[str, str, str | None, str | None]
# The variables a template string reads, noted once per use of the string: (its roots, the JSON Pointer of the
# template, the string's pointer inside it, node id, step id); made into Reads only if a root is not known.
StringRead = tuple[tuple[str, ...], str, str, str | None, str | None]


@dataclass
class Compilation:
    """The state of one compilation and the typed field readers that report into it.

    A reader checks a field, reports a problem as a :class:`Diagnostic` at its JSON Pointer (tagged with the
    current node and step), and returns the value, or None (``MISSING`` for a required field that is absent).
    """

    diags: list[Diagnostic] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    string_reads: list[StringRead] = field(default_factory=list)
    produced: set[str] = field(default_factory=set)
    secret_aliases: set[str] = field(default_factory=set)
    secret_uses: list[tuple[str, str, str | None, str | None]] = field(default_factory=list)
    node_id: str | None = None
    step_id: str | None = None
    gc: GlobalConfigIR = field(default_factory=GlobalConfigIR)
    pending_subflows: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    secrets: dict[str, SecretReferenceIR] = field(default_factory=dict)
    # Whether no object of the document has a comment key or a null value (see :func:`plain_text`): then
    # :meth:`view` returns every object as it is, without looking.
    plain: bool = False

    def add(self, severity: Severity, code: str, message: str, path: str, hint: str | None = None) -> None:
        self.diags.append(Diagnostic(severity=severity, code=code, message=message, path=path,
                                     node_id=self.node_id, step_id=self.step_id, hint=hint))

    def where(self) -> str:
        if self.node_id is None:
            return ""
        if self.step_id is None:
            return f"Node '{self.node_id}'"
        return f"Node '{self.node_id}', step '{self.step_id}'"

    def expect(self, value: Any, kinds: tuple[type, ...], expected: str, path: str) -> bool:
        if type(value) in kinds:  # the common case, without the bool-is-an-int test
            return True
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            self.add("error", "invalid_type", f"{path}: expected {expected}, got {json_type_name(value)}", path)
        return ok

    def obj(self, value: Any, path: str, known: Iterable[str] | None = None) -> dict[str, Any] | None:
        """An object field: comments and nulls dropped, unknown keys warned about when ``known`` is given."""
        if type(value) is not dict and not self.expect(value, (dict,), "object", path):
            return None
        out = strip_object(value)
        if known is not None:
            self.unknown_fields(out, known, path)
        return out

    def view(self, value: Any, path: str) -> dict[str, Any] | None:
        """An object field only read, never changed: as :meth:`obj` without ``known``, but the object itself
        when there is nothing to drop from it (no copy)."""
        if type(value) is dict:  # (as _plain_object, without one more call: there is a view of most objects)
            if self.plain:
                return value
            try:
                keys = "\0".join(value)
            except TypeError:  # a key that is not a string
                keys = "_"
            if not (keys.startswith("_") or "\0_" in keys or None in value.values()):
                return value
        return self.obj(value, path)

    def unknown_fields(self, obj: Mapping[str, Any], known: Iterable[str], path: str) -> None:
        known_set = known if isinstance(known, (frozenset, set)) else set(known)
        if known_set.issuperset(obj):
            return
        for key in obj:
            if key not in known_set:
                self.add("warning", "unknown_field", f"{path}: unknown field '{key}' is ignored",
                         f"{path}/{pointer(key)[1:]}")

    def required(self, obj: Mapping[str, Any], key: str, path: str) -> Any:
        if key not in obj:
            self.add("error", "missing_field", f"{path or '/'}: required field '{key}' is missing",
                     f"{path}/{pointer(key)[1:]}")
            return MISSING
        return obj[key]

    def string(self, obj: Mapping[str, Any], key: str, path: str, required: bool = False) -> str | None:
        v = self.required(obj, key, path) if required else obj.get(key, MISSING)
        if v is MISSING:
            return None
        if type(v) is str:  # (the path of a problem is made only for a problem)
            return v
        return v if self.expect(v, (str,), "string", f"{path}/{key}") else None

    def boolean(self, obj: Mapping[str, Any], key: str, path: str, default: bool = False) -> bool:
        v = obj.get(key, MISSING)
        if v is MISSING:
            return default
        if type(v) is bool:
            return v
        return bool(v) if self.expect(v, (bool,), "boolean", f"{path}/{key}") else default

    def integer(self, obj: Mapping[str, Any], key: str, path: str, minimum: int = 0,
                required: bool = False) -> int | None:
        v = self.required(obj, key, path) if required else obj.get(key, MISSING)
        if v is MISSING:
            return None
        p = f"{path}/{key}"
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not self.expect(v, (int,), "integer", p):
            return None
        if v < minimum:
            self.add("error", "invalid_value", f"{p}: '{v}' is not valid; expected an integer >= {minimum}", p)
            return None
        return int(v)

    def number(self, obj: Mapping[str, Any], key: str, path: str, minimum: float | None = None,
               exclusive: bool = False) -> float | None:
        v = obj.get(key, MISSING)
        if v is MISSING:
            return None
        p = f"{path}/{key}"
        if not self.expect(v, (int, float), "number", p):
            return None
        if minimum is not None and (v <= minimum if exclusive else v < minimum):
            bound = f"> {minimum}" if exclusive else f">= {minimum}"
            self.add("error", "invalid_value", f"{p}: '{v}' is not valid; expected a number {bound}", p)
            return None
        try:
            return float(v)
        except OverflowError:  # an integer beyond a double's range
            self.add("error", "invalid_value", f"{p}: the number is too large (beyond ±1.8e308)", p)
            return None

    def enum(self, obj: Mapping[str, Any], key: str, path: str, values: tuple[str, ...],
             aliases: Mapping[str, str] | None = None, fold_case: bool = False,
             severity: Severity = "error") -> str | None:
        v = obj.get(key, MISSING)
        if v is MISSING:
            return None
        p = f"{path}/{key}"
        if not self.expect(v, (str,), "string", p):
            return None
        candidate = v.lower() if fold_case else v
        if aliases and candidate in aliases:
            self.add("info", "alias_normalised", f"{p}: '{v}' read as '{aliases[candidate]}'", p)
            candidate = aliases[candidate]
        if candidate not in values:
            self.add(severity, "invalid_value", f"{p}: '{v}' is not valid; expected one of {', '.join(values)}", p)
            return None
        return str(candidate)

    def identifier(self, value: Any, path: str, kind: str, pattern: re.Pattern[str] = ID_RE) -> str | None:
        if not self.expect(value, (str,), "string", path):
            return None
        if not pattern.match(value):
            self.add("error", "invalid_identifier", f"{path}: '{value}' is not a valid {kind}", path)
            return None
        return str(value)

    def node_ref(self, obj: Mapping[str, Any], key: str, path: str, required: bool = False) -> str | None:
        v = self.required(obj, key, path) if required else obj.get(key, MISSING)
        if v is MISSING:
            return None
        if type(v) is str:
            return v
        return v if self.expect(v, (str,), "node id (string)", f"{path}/{key}") else None

    def written(self, value: Any, path: str) -> str | None:
        """A variable name the procedure writes (counted as produced)."""
        if not self.expect(value, (str,), "string", path):
            return None
        if value in BUILTIN_NAMES:
            self.add("error", "reserved_variable_name", f"{path}: '{value}' is a reserved name", path)
            return None
        if not VAR_RE.match(value):
            self.add("error", "invalid_identifier", f"{path}: '{value}' is not a valid variable name", path)
            return None
        self.produced.add(value)
        return str(value)

    def written_field(self, obj: Mapping[str, Any], key: str, path: str, required: bool = False) -> str | None:
        v = self.required(obj, key, path) if required else obj.get(key, MISSING)
        if v is MISSING:
            return None
        return self.written(v, f"{path}/{key}")

    def dispatch_mode(self, obj: Mapping[str, Any], key: str, path: str) -> str | None:
        if key not in obj:
            return None
        v = obj.get(key)
        return self.enum({key: v.lower() if isinstance(v, str) else v} if key in obj else {}, key, path,
                         ("async", "sync"))
