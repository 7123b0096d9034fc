"""The entry points and the document level: decoding, the dialect check, the top-level fields, and the order of
the passes that build the :class:`ProcedureIR`."""

from __future__ import annotations

import gc
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

import orjson

from ckp_core.compiler.checks import ProcedureLookup, check_secret_aliases, reachability, subflow_checks, undeclared
from ckp_core.compiler.config import global_config
from ckp_core.compiler.fields import MISSING, PROCEDURE_ID_RE, Compilation, plain_text, strip_object
from ckp_core.compiler.graph import graph
from ckp_core.compiler.nodes.subflow import finish_subflows
from ckp_core.compiler.trigger import trigger
from ckp_core.compiler.variables_schema import variables_schema
from ckp_core.diagnostics import Diagnostic, sort_key
from ckp_core.expressions import json_type_name
from ckp_core.ir import ProcedureIR, SubflowPayload, SubflowRefIR

COMPILER_VERSION = "0.2.0"
MAX_DOCUMENT_BYTES = 10 * 1024 * 1024
MAX_NESTING = 128
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
RESERVED_VERSIONS = frozenset({"latest", "versions", "deployments", "diff"})
ROOT_FIELDS = frozenset({
    "procedure_id", "version", "name", "description", "status", "effective_date", "trigger",
    "retrieval_metadata", "global_config", "variables_schema", "workflow_graph", "provenance", "release",
    "$schema",
})
RETRIEVAL_ALIASES = {"intents": "primary_intents", "domain": "business_domain"}
_CONTAINERS = (dict, list)  # a tuple: isinstance with a union type is several times slower
_PLAIN = frozenset({dict, list, str, int, bool, type(None)})
_ORJSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS


@dataclass
class CompileResult:
    """Either an IR (no errors) or the diagnostics explaining why not; warnings/infos in both cases."""

    diagnostics: list[Diagnostic]
    ir: ProcedureIR | None = None
    procedure_id: str | None = None
    version: str | None = None

    @property
    def ok(self) -> bool:
        return self.ir is not None

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    def summary(self) -> dict[str, int]:
        out = {"errors": 0, "warnings": 0, "infos": 0}
        for d in self.diagnostics:
            out[{"error": "errors", "warning": "warnings", "info": "infos"}[d.severity]] += 1
        return out


def canonical_json(value: Any) -> str:
    """Canonical JSON text: sorted keys, compact separators, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(doc: Any) -> str:
    """``sha256:<hex>`` of the canonical JSON of a document."""
    return _sha256(canonical_json(doc).encode("utf-8"))


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compile_text(text: str | bytes, lookup: ProcedureLookup | None = None) -> CompileResult:
    """Decode JSON text (≤ 10 MiB) and compile it."""
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > MAX_DOCUMENT_BYTES:
        return CompileResult([Diagnostic(severity="error", code="invalid_document", path="",
                                         message=f"CKP document is {size} bytes; the limit is 10 MiB")])
    floats = _FloatsSeen()
    # The decoded document stays alive until the end as well: the cyclic collector is paused from here (see
    # _compile), and the collections its decoding would start do not rescan it.
    collecting = gc.isenabled()
    gc.disable()
    try:
        try:
            doc = json.loads(text, parse_float=floats, parse_constant=floats)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return CompileResult([Diagnostic(severity="error", code="invalid_document", path="",
                                             message=f"CKP document is not valid JSON: {exc}")])
        return _compile(doc, lookup, decoded_plain=not floats.seen)
    finally:
        if collecting:
            gc.enable()


class _FloatsSeen:
    """``parse_float`` and ``parse_constant`` (NaN, Infinity, -Infinity) for ``json.loads``: floats as
    json.loads makes them, noting that there was one (a document decoded without is plain JSON data: only str,
    int, bool, null, objects and arrays)."""

    seen = False

    def __call__(self, text: str) -> float:
        self.seen = True
        return float(text)


def compile_document(doc: Any, lookup: ProcedureLookup | None = None) -> CompileResult:
    """Compile a decoded CKP document. Never raises for bad input: problems come back as diagnostics."""
    return _compile(doc, lookup)


def _compile(doc: Any, lookup: ProcedureLookup | None, decoded_plain: bool = False) -> CompileResult:
    if not isinstance(doc, dict):
        return CompileResult([Diagnostic(severity="error", code="invalid_document", path="",
                                         message="CKP document must be a JSON object")])
    problem, canonical = _document_problem(doc, decoded_plain)
    if problem is not None:
        return CompileResult([Diagnostic(severity="error", code="invalid_document", path="", message=problem)])
    dialect = _dialect(doc)
    if dialect is not None:
        return CompileResult([dialect])
    # Compiling allocates many small objects that all stay alive until the end: the cyclic collector would
    # only rescan them (about a third of the time on large documents). It is paused for this synchronous call.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return compile_procedure(strip_object(doc), doc, lookup, canonical)
    finally:
        if collecting:
            gc.enable()


def _document_problem(doc: dict[str, Any], decoded_plain: bool = False) -> tuple[str | None, bytes | None]:
    """Why a decoded document cannot be stored as canonical JSON (too deep, non-finite numbers, lone
    surrogates), or None with the document's canonical JSON as UTF-8 (None when it could not be made here).

    ``decoded_plain``: the document is known to be plain JSON data (decoded from text without a float).
    """
    if decoded_plain and _ORJSON_CHECKS_DEPTH:
        # orjson refuses nesting deeper than _ORJSON_MAX_DEPTH: inside _WRAP arrays, the document is written
        # only when it is at most MAX_NESTING deep, and the walk of _shape is not needed.
        wrapped: Any = doc
        for _ in range(_WRAP):
            wrapped = [wrapped]
        try:
            return None, orjson.dumps(wrapped, option=_ORJSON_OPTIONS)[_WRAP:-_WRAP]
        except orjson.JSONEncodeError:  # too deep, an integer beyond 64 bits, a lone surrogate: as below
            pass
    too_deep, plain = _shape(doc)
    if too_deep:
        return f"CKP document is nested deeper than {MAX_NESTING} levels", None
    # The canonical text serves both as this check and, later, as the content hash. orjson writes plain data
    # (no floats, whose repr it formats differently) byte for byte as json.dumps does, about 5 times faster.
    if plain:
        try:
            return None, orjson.dumps(doc, option=_ORJSON_OPTIONS)
        except orjson.JSONEncodeError:  # an integer beyond 64 bits, a lone surrogate: json.dumps decides below
            pass
    # When json.dumps fails (or cannot sort), the check is repeated on the text in document order, whose first
    # error is the one reported.
    try:
        return None, json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                allow_nan=False).encode("utf-8")
    except (ValueError, TypeError, RecursionError):
        pass
    try:
        json.dumps(doc, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except ValueError as exc:
        return f"CKP document holds a value JSON cannot represent: {exc}", None
    except (TypeError, RecursionError) as exc:
        return f"CKP document is not JSON data: {exc}", None
    return None, None


def _shape(doc: dict[str, Any]) -> tuple[bool, bool]:
    """Whether an object or array is nested deeper than MAX_NESTING (the document itself is level 1), and
    whether every value is plain JSON data without a float (exactly str, int, bool, null, object, array)."""
    level: list[Any] = [doc]
    plain = True
    for _ in range(MAX_NESTING):
        # One level at a time, in comprehensions. A level this large means shared or circular containers (not
        # decoded JSON text), where the walk that follows one path at a time finds a cycle sooner.
        if len(level) > 1_000_000:
            return _too_deep_by_path(doc), False
        items = [item for value in level for item in (value.values() if isinstance(value, dict) else value)]
        plain = plain and _PLAIN.issuperset(map(type, items))
        level = [item for item in items if isinstance(item, _CONTAINERS)]
        if not level:
            return False, plain and type(doc) is dict
    return True, False


def _nested_arrays(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _orjson_checks_depth() -> bool:
    """Whether orjson.dumps writes exactly up to _ORJSON_MAX_DEPTH levels of nesting (true of orjson 3)."""
    try:
        orjson.dumps(_nested_arrays(_ORJSON_MAX_DEPTH))
    except orjson.JSONEncodeError:
        return False
    try:
        orjson.dumps(_nested_arrays(_ORJSON_MAX_DEPTH + 1))
    except orjson.JSONEncodeError:
        return True
    return False


_ORJSON_MAX_DEPTH = 254  # orjson: "Recursion limit reached" beyond
_WRAP = _ORJSON_MAX_DEPTH - MAX_NESTING
_ORJSON_CHECKS_DEPTH = _orjson_checks_depth()


def _too_deep_by_path(doc: dict[str, Any]) -> bool:
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_NESTING:
            return True
        items = value.values() if isinstance(value, dict) else value
        stack.extend((item, depth + 1) for item in items if isinstance(item, dict | list))
    return False


def _dialect(doc: dict[str, Any]) -> Diagnostic | None:
    wg = doc.get("workflow_graph")
    if isinstance(wg, dict) and isinstance(wg.get("nodes"), list):
        return Diagnostic(severity="error", code="unsupported_dialect", path="/workflow_graph/nodes",
                          message="unsupported CKP dialect: workflow_graph.nodes must be an object keyed by node id")
    if "workflow_graph" not in doc:
        if isinstance(doc.get("nodes"), list):
            return Diagnostic(severity="error", code="unsupported_dialect", path="/nodes",
                              message="unsupported CKP dialect: nodes must be inside workflow_graph as an object keyed "
                              "by node id (found a top-level 'nodes' array)")
        for key in ("start_node_id", "entry"):
            if key in doc:
                return Diagnostic(severity="error", code="unsupported_dialect", path=f"/{key}",
                                  message="unsupported CKP dialect: the entry node is workflow_graph.start_node "
                                  f"(found '{key}')")
    return None


def compile_procedure(doc: dict[str, Any], original: dict[str, Any], lookup: ProcedureLookup | None,
                      canonical: bytes | None = None) -> CompileResult:
    """The passes over a document that passed the dialect check (``doc``: ``original`` without comments;
    ``canonical``: the canonical JSON of ``original`` when already made)."""
    c = Compilation(plain=canonical is not None and plain_text(canonical))
    c.unknown_fields(doc, ROOT_FIELDS, "")
    procedure_id = identity(c, doc, "procedure_id", PROCEDURE_ID_RE, "procedure id")
    version = identity(c, doc, "version", VERSION_RE, "version")
    if version is not None and version.lower() in RESERVED_VERSIONS:
        c.add("error", "invalid_value", f"/version: '{version}' is not valid; expected a version that is not "
              "a reserved word (latest, versions, deployments, diff)", "/version")
    if procedure_id == "validate":
        c.add("error", "invalid_value", "/procedure_id: 'validate' is not valid; expected a procedure id "
              "that is not reserved", "/procedure_id")
    name = c.string(doc, "name", "")
    description = c.string(doc, "description", "")
    status = c.enum(doc, "status", "", ("draft", "active", "approved", "inactive", "deprecated", "archived"),
                    severity="warning")
    status = status or (doc.get("status") if isinstance(doc.get("status"), str) else None)
    effective = effective_date(c, doc)
    c.gc, gc_on_failure = global_config(c, doc)
    variables = variables_schema(c, doc)
    trigger_ir = trigger(c, doc)
    retrieval = retrieval_metadata(c, doc)
    provenance = c.obj(doc["provenance"], "/provenance") if "provenance" in doc else None
    g = graph(c, doc, gc_on_failure)
    nodes, start_node, edges, unknown_types, raw_node_ids = g.nodes, g.start_node, g.edges, g.unknown_types, g.node_ids
    finish_subflows(c, nodes, variables, trigger_ir)
    subflow_refs = [SubflowRefIR(node_id=n.id, procedure_id=n.payload.procedure_id, version=n.payload.version)
                    for n in nodes.values() if type(n.payload) is SubflowPayload] if c.pending_subflows else []
    subflow_checks(c, lookup, procedure_id, subflow_refs)
    if not unknown_types and start_node is not None and start_node in raw_node_ids:
        reachability(c, start_node, raw_node_ids, g.edge_ends, nodes, g.path_ends)
    undeclared(c, variables, trigger_ir)
    check_secret_aliases(c)
    c.diags.sort(key=sort_key)
    if any(d.severity == "error" for d in c.diags):
        return CompileResult(c.diags, None, procedure_id, version)
    assert procedure_id is not None
    assert version is not None
    assert start_node is not None
    digest = content_hash(original) if canonical is None else _sha256(canonical)
    ir = ProcedureIR(
        procedure_id=procedure_id, version=version, name=name or procedure_id, description=description,
        status=status, effective_date=effective, content_hash=digest,
        compiler_version=COMPILER_VERSION, trigger=trigger_ir, global_config=c.gc, variables=variables,
        secrets=c.secrets, start_node=start_node, nodes=nodes, edges=edges, subflow_refs=subflow_refs,
        retrieval_metadata=retrieval, provenance=provenance, tags=_tags(retrieval), diagnostics=c.diags,
    )
    return CompileResult(c.diags, ir, procedure_id, version)


def identity(c: Compilation, doc: dict[str, Any], key: str, pattern: re.Pattern[str],
             kind: str) -> str | None:
    v = c.required(doc, key, "")
    if v is MISSING:
        return None
    return c.identifier(v, f"/{key}", kind, pattern)


def effective_date(c: Compilation, doc: dict[str, Any]) -> str | None:
    effective = c.string(doc, "effective_date", "")
    if effective is None:
        return None
    try:
        if len(effective) != 10:
            raise ValueError(effective)
        date.fromisoformat(effective)
    except ValueError:
        c.add("error", "invalid_value", f"/effective_date: '{effective}' is not valid; expected YYYY-MM-DD",
              "/effective_date")
        return None
    return effective


def retrieval_metadata(c: Compilation, doc: dict[str, Any]) -> dict[str, Any] | None:
    raw = doc.get("retrieval_metadata")
    if raw is None:
        return None
    meta = c.obj(raw, "/retrieval_metadata")
    if meta is None:
        return None
    for alias, canonical in RETRIEVAL_ALIASES.items():
        if alias in meta:
            value = meta.pop(alias)
            c.add("info", "alias_normalised", f"/retrieval_metadata/{alias}: '{alias}' read as '{canonical}'",
                  f"/retrieval_metadata/{alias}")
            meta.setdefault(canonical, value)
    for key in ("primary_intents", "negative_intents", "keywords", "tags"):
        v = meta.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(i, str) for i in v)):
            c.add("error", "invalid_type", f"/retrieval_metadata/{key}: expected array of strings, got "
                  f"{json_type_name(v)}", f"/retrieval_metadata/{key}")
    if "business_domain" in meta:
        c.expect(meta["business_domain"], (str,), "string", "/retrieval_metadata/business_domain")
    return meta


def _tags(meta: Mapping[str, Any] | None) -> list[str]:
    tags = meta.get("tags") if meta else None
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []
